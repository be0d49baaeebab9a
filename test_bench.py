"""
CPU tests of bench.py's pieces that need no GPU: FLOP counting against a brute-force count of
the keys the reference attends to, argument parsing, the no-GPU exit, tables and JSON.

    python -m pytest -q test_bench.py
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import nsa_kernels as nk

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = dict(block_len=16, block_stride=8, select_block=32, n_select=4, window=48)


def brute_force_counts(T, hp, H=2, G=3):
    """Keys attended per branch, summed over queries, read off the reference's own masks:
    compressed blocks with nonzero probability, tokens s <= t of the blocks select_blocks_ref
    picks (for every KV head: they must all agree), window tokens by a loop."""
    l, d, ls, n, w = (hp[k] for k in ("block_len", "block_stride", "select_block", "n_select",
                                      "window"))
    Tc = nk.num_compressed_blocks(T, l, d)
    q = torch.randn(1, T, H * G, 8, dtype=torch.float64)
    k_cmp = torch.randn(1, Tc, H, 8, dtype=torch.float64)
    p = nk.compressed_probs_ref(q, k_cmp, l, d, scale=0.3)                  # [1, HQ, T, Tc]
    compressed = int((p[0, 0] > 0).sum())
    selected_blocks, _ = nk.select_blocks_ref(p.view(1, H, G, T, Tc), T, l, d, ls, n)
    selected = set()
    for h in range(H):
        count = 0
        for t in range(T):
            for s in range(t + 1):
                count += bool(selected_blocks[0, h, t, s // ls])
        selected.add(count)
    assert len(selected) == 1
    window = sum(1 for t in range(T) for s in range(T) if t - w < s <= t)
    causal = sum(1 for t in range(T) for s in range(T) if s <= t)
    return {"compressed": compressed, "selected": selected.pop(), "window": window,
            "causal": causal}


@pytest.mark.parametrize("T", [1, 10, 17, 100, 250])
def test_key_counts_match_reference_masks(T):
    torch.manual_seed(T)
    assert bench.nsa_key_counts(T, **SMALL) == brute_force_counts(T, SMALL)


def test_flop_formulas():
    T, B, HQ, D = 250, 2, 6, 16
    c = bench.nsa_key_counts(T, **SMALL)
    attended = c["compressed"] + c["selected"] + c["window"]
    fwd = B * HQ * (4 * D * attended + 2 * D * c["compressed"])
    assert bench.nsa_flops(B, T, HQ, D, SMALL, "fwd") == fwd
    assert bench.nsa_flops(B, T, HQ, D, SMALL, "fwd+bwd") == fwd + B * HQ * 10 * D * attended
    branches_fwd = sum(bench.nsa_branch_flops(B, T, HQ, D, SMALL, b, "fwd")
                       for b in bench.BRANCHES)
    assert branches_fwd == fwd
    assert bench.sdpa_flops(B, T, HQ, D, "fwd") == B * HQ * 4 * D * c["causal"]
    assert bench.sdpa_flops(B, T, HQ, D, "fwd+bwd") == B * HQ * 14 * D * c["causal"]


def test_paper_counts_are_sparse_at_64k():
    c = bench.nsa_key_counts(65536, **bench.PAPER_HP)
    per_query = (c["compressed"] + c["selected"] + c["window"]) / 65536
    assert 3500 < per_query < 3600          # ~2048 compressed + ~1020 selected + ~510 window
    assert bench.decode_tokens_read(65536, **bench.PAPER_HP) == pytest.approx(5630)
    assert 65536 / bench.decode_tokens_read(65536, **bench.PAPER_HP) == pytest.approx(11.64, 0.01)


def test_parse_args_and_lengths():
    assert bench.parse_lengths("4k, 8192,128k") == [4096, 8192, 131072]
    args = bench.parse_args(["kernel", "--quick"])
    assert args.mode == "kernel" and args.rep < 100 and args.steps == 2
    assert bench.lengths_for(args, bench.KERNEL_T) == [4096, 8192, 16384]
    args = bench.parse_args(["decode", "--T", "8k,32k", "--batch", "2"])
    assert bench.lengths_for(args, bench.DECODE_T) == [8192, 32768] and args.batch == [2]
    with pytest.raises(SystemExit):
        bench.parse_args(["nonsense"])


def test_config_is_read_without_executing(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("import os\nn_layer = 6\nn_head = 8\nn_kv_head = 1\nn_embd = 512\n"
                   "window = 256\nout_dir = os.path.join('a', 'b')\n")
    fields, source = bench.load_model_fields(str(cfg))
    assert source == str(cfg)
    assert (fields["n_layer"], fields["n_head"], fields["n_embd"], fields["window"]) == \
        (6, 8, 512, 256)
    assert "block_size" not in fields and "attention" not in fields


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_kernel_mode_without_cuda_exits_with_message():
    proc = subprocess.run([sys.executable, "bench.py", "kernel"], cwd=HERE, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs an NVIDIA GPU" in proc.stderr and "Triton" in proc.stderr


def fake_rows():
    base = dict(kind="kernel", shape="paper", shape_desc="B=1 HQ=64 H=4 D=128", B=1, HQ=64, H=4,
                D=128)
    rows = []
    for T, nsa_ms in [(4096, 1.5), (131072, 180.0)]:
        for pass_, f in [("fwd", 1.0), ("fwd+bwd", 3.5)]:
            rows.append(dict(base, T=T, impl="nsa", status="ok", ms=nsa_ms * f, method="events",
                             reps=3, peak_gib=2.0, finite=True, tflops=100.0,
                             **{"pass": pass_}))
            rows.append(dict(base, T=T, impl="sdpa_flash", status="ok" if T < 131072 else "OOM",
                             ms=3.0 * f, method="do_bench", reps=30, peak_gib=1.0, finite=True,
                             tflops=300.0, **{"pass": pass_}))
            rows.append(dict(base, T=T, impl="sdpa_cudnn", status="unsupported",
                             error="No available kernel", **{"pass": pass_}))
            rows.append(dict(base, kind="branch", T=T, branch="window", status="ok",
                             ms=0.2 * f, method="do_bench", reps=10, peak_gib=1.0, finite=True,
                             tflops=50.0, **{"pass": pass_}))
    rows.append(dict(kind="kernel_profile", shape="paper", T=131072, status="ok",
                     kernels={"_dense_fwd_kernel": 900.0, "_combine_fwd_kernel": 100.0,
                              "void at::native::elementwise_kernel<128, 2>(int)": 2.0},
                     groups={"compressed+window (shared kernel)": 900.0}, **{"pass": "fwd"}))
    rows.append(dict(kind="decode", shape="paper", shape_desc="HQ=64 H=4 D=128", T=8192, B=1,
                     impl="nsa_ref", status="ok", ms=0.9, method="events", reps=3,
                     peak_gib=1.0, finite=True, tokens_read_nsa=2046.0, tokens_read_full=8192,
                     kv_bytes=2 * 8192 * 4 * 128 * 2))
    rows.append(dict(rows[-1], impl="sdpa_flash", ms=0.018))
    rows.append(dict(kind="train", attention="nsa", T=8192, B=1, model_desc="12 layers",
                     status="ok", ms=300.0, tokens_per_s=27306.0, mfu=0.31, peak_gib=20.0))
    rows.append(dict(kind="train_fit", attention="nsa", T=131072, B=1, model_desc="12 layers",
                     status="OOM", error="CUDA out of memory"))
    return rows


def test_tables_and_json_round_trip(tmp_path):
    path = tmp_path / "sub" / "bench.json"
    rec = bench.Recorder(str(path), {"gpu": "test", "command": "python bench.py kernel"})
    for row in fake_rows():
        rec.add(row)
    env, rows = bench.load_results(str(path))
    assert env["gpu"] == "test" and rows == fake_rows()
    text = bench.all_tables(rows)
    assert text == bench.all_tables(fake_rows())
    kernel = bench.kernel_table(rows)
    assert "| 4k | 1.50 | 3.00 | unsupported | 2.00x |" in kernel
    assert "| 128k | 180 | OOM | unsupported | - |" in kernel
    assert "_dense_fwd_kernel" in bench.profile_table(rows)
    assert "elementwise" not in bench.profile_table(rows)        # under 1%
    assert "| 1 | 8k | 900 | 18.0 | 0.02x | 0.93 | 2046 | 8192 | 4.0x |" in bench.decode_table(rows)
    assert "nsa: 8k (next OOM)" in bench.train_table(rows)
    table = [line for line in kernel.splitlines() if line.startswith("|")]
    assert len(table) == 4                                       # header, rule, 2 sizes
    assert all(line.endswith(" |") and line.count("|") == table[0].count("|") for line in table)


def test_kernel_names_map_to_branches():
    assert bench.kernel_group("_select_kernel") == "selection"
    assert bench.kernel_group("_slc_bwd_dkdv_kernel") == "selected"
    assert bench.kernel_group("_combine_bwd_kernel") == "gates/combine"
    assert bench.kernel_group("_dense_fwd_kernel").startswith("compressed+window")
    assert bench.kernel_group("void cub::DeviceRadixSortOnesweepKernel<aggregate>(int)") == \
        "other (torch ops)"


def test_peak_table():
    assert bench.peak_flops("NVIDIA H200") == 989e12
    assert bench.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench.peak_flops("Some Other GPU") is None


def test_predictor_extrapolates():
    p = bench.Predictor()
    assert p.predict("x", 8192) is None
    p.add("x", 4096, 1.0)
    assert p.predict("x", 8192) == pytest.approx(4.0)            # quadratic until two points
    p.add("x", 8192, 2.0)
    assert p.predict("x", 16384) == pytest.approx(4.0)           # fitted: linear


def test_plot_is_optional(tmp_path):
    path = tmp_path / "plot.png"
    try:
        import matplotlib
    except ImportError:
        assert bench.plot_kernel(fake_rows(), str(path)) is False
        return
    assert matplotlib.__version__
    assert bench.plot_kernel(fake_rows(), str(path)) is True
    assert path.stat().st_size > 1000


def test_json_is_valid_after_every_row(tmp_path):
    path = tmp_path / "b.json"
    rec = bench.Recorder(str(path), {})
    assert json.loads(path.read_text()) == {"env": {}, "rows": []}
    rec.add(fake_rows()[0])
    assert len(json.loads(path.read_text())["rows"]) == 1


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs nsa_kernels' Triton kernels on the CPU interpreter")
def test_nsa_wrappers_match_the_kernels_api():
    """bench.py's calls into nsa_kernels (whole call with the check, and each branch alone) on
    CPU tensors under the interpreter, fp32: catches an API change before a GPU run does."""
    rec = bench.Recorder(None, {})
    assert bench.check_correctness(rec, None, SMALL, dev="cpu", dtype=torch.float32,
                                   cases=[(1, 80, 16, 1, 16)])
    assert rec.rows[0]["kind"] == "check" and rec.rows[0]["ok"]
    xs = bench.nsa_inputs(1, 80, 16, 1, 16, SMALL, dtype=torch.float32, dev="cpu")
    assert bench.kernel_refusal(xs) is None
    fns = bench.nsa_branch_fns(xs, SMALL, torch.randn_like(xs[0]))
    assert set(fns) == set(bench.BRANCHES)
    for branch, passes in fns.items():
        for pass_, fn in passes.items():
            assert bench.all_finite(fn()), (branch, pass_)
    xd = bench.nsa_inputs(2, 80, 16, 1, 16, SMALL, dtype=torch.float32, requires_grad=False,
                          Tq=1, dev="cpu")
    for fn in bench.nsa_decode_fns(SMALL).values():
        assert fn(*xd).shape == (2, 1, 16, 16)
