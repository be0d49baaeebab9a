"""
CPU tests of bench.py's pieces that need no GPU: key and FLOP counting (against the keys the
reference attends to), arguments and one-line errors, the JSON file, the tables, the profiler's
kernel grouping, and the optional plot and fla peer.

    python -m pytest -q test_bench.py
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import bench
import common
import nsa_kernels as nk
from model import nsa_key_counts

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = dict(block_len=16, block_stride=8, select_block=32, n_select=4, window=48)


def keys_attended(T, hp, gate, H=2, G=3):
    """[T, HQ]: keys each query attends to in one branch of nsa_attention_ref, read off its
    probabilities: values are one-hot (v[s] = e_s, v_cmp[i] = e_i), and only that branch's gate
    is 1, so a query's output is its row of attention probabilities; its nonzeros are the keys."""
    Tc = nk.num_compressed_blocks(T, hp["block_len"], hp["block_stride"])
    D = max(16, T)
    eye = torch.eye(D, dtype=torch.float64)
    q = torch.randn(1, T, H * G, D, dtype=torch.float64)
    k, k_cmp = torch.randn(1, T, H, D, dtype=torch.float64), torch.randn(1, Tc, H, D,
                                                                          dtype=torch.float64)
    v = eye[:T, None, :].expand(T, H, D)[None].contiguous()
    v_cmp = eye[:Tc, None, :].expand(Tc, H, D)[None].contiguous()
    gates = {g: torch.full((1, T, H * G), float(g == gate), dtype=torch.float64)
             for g in ("g_cmp", "g_slc", "g_win")}
    o = nk.nsa_attention_ref(q, k, v, k_cmp, v_cmp, **gates, **hp)
    return (o[0] != 0).sum(-1)


@pytest.mark.parametrize("T", [1, 10, 17, 100, 250])
def test_key_counts_match_reference(T):
    torch.manual_seed(T)
    counts = nsa_key_counts(T, **SMALL)
    for branch, gate in [("compressed", "g_cmp"), ("selected", "g_slc"), ("window", "g_win")]:
        per_query = keys_attended(T, SMALL, gate)
        # every head attends to as many keys (selected blocks differ, their sizes do not)
        assert (per_query == per_query[:, :1]).all(), branch
        assert int(per_query[:, 0].sum()) == counts[branch], branch
    assert counts["causal"] == sum(t + 1 for t in range(T))


def test_flop_formulas():
    B, T, HQ, D = 2, 250, 6, 16
    c = nsa_key_counts(T, **SMALL)
    attended = c["compressed"] + c["selected"] + c["window"]
    scoring = 2 * B * HQ * D * c["compressed"]
    assert bench.nsa_flops(B, T, HQ, D, SMALL, "fwd") == 4 * B * HQ * D * attended + scoring
    assert bench.nsa_flops(B, T, HQ, D, SMALL, "fwd+bwd") == 14 * B * HQ * D * attended + scoring
    for p in bench.PASSES:  # the branches add up to the whole call (the selection: forward only)
        assert sum(bench.nsa_flops(B, T, HQ, D, SMALL, p, b) for b in bench.BRANCHES) == \
            bench.nsa_flops(B, T, HQ, D, SMALL, p)
    assert bench.attention_flops(B, HQ, D, c["causal"], "fwd+bwd") == \
        3.5 * bench.attention_flops(B, HQ, D, c["causal"], "fwd")


def test_paper_counts_are_sparse_at_64k():
    c = nsa_key_counts(65536, **nk.PAPER_HP)
    per_query = (c["compressed"] + c["selected"] + c["window"]) / 65536
    assert 3500 < per_query < 3600          # ~2048 compressed + ~1010 selected + ~510 window
    assert bench.decode_tokens_read(65536, nk.PAPER_HP) == pytest.approx(5630)
    assert 65536 / bench.decode_tokens_read(65536, nk.PAPER_HP) == pytest.approx(11.64, 0.01)


def test_arguments():
    assert bench.parse_lengths("4k, 8192,128k") == [4096, 8192, 131072]
    args = bench.parse_args(["kernel", "--quick"])
    assert bench.lengths(args, bench.KERNEL_T) == [4096, 8192, 16384]
    args = bench.parse_args(["decode", "--T", "8k,32k", "--quick"])
    assert bench.lengths(args, bench.DECODE_T) == [8192, 32768]
    assert bench.attention_shape(bench.parse_args(["kernel"]))[:3] == (64, 4, 128)
    HQ, H, D, hp = bench.attention_shape(bench.parse_args(["kernel", "--G", "1"]))
    assert (HQ, H, D, hp) == (4, 4, 128, nk.PAPER_HP)
    # --shape=model: the heads of the 8k GPU config, read through GPTConfig's fields
    HQ, H, D, hp = bench.attention_shape(bench.parse_args(["kernel", "--shape=model"]))
    assert (HQ, H, D, hp) == (16, 1, 64, nk.PAPER_HP)
    assert bench.model_fields(bench.TRAIN_CONFIG)["n_layer"] == 8


@pytest.mark.parametrize("argv,message", [
    (["kernel", "--T", "0"], "lengths are positive"),
    (["kernel", "--T", "4q"], "lengths are positive"),
    (["kernel", "--G", "0"], "--G must be >= 1"),
    (["kernel", "--G", "4", "--shape=model"], "--G must be >= 1"),
    (["benchmark"], "invalid choice"),
    (["kernel", "--json", os.path.join(HERE, "no_such_folder", "b.json")], "existing folder"),
    (["kernel", "--json", HERE], "existing folder"),
])
def test_user_mistakes_raise_user_error(argv, message):
    with pytest.raises(common.UserError, match=message):
        bench.main(argv)


@pytest.mark.parametrize("argv,message", [
    pytest.param(["kernel"], "needs an NVIDIA GPU", id="no-cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs no CUDA")),
    pytest.param(["kernel", "--T", "4x"], "argument --T", id="bad-T"),
])
def test_mistakes_print_one_line(argv, message):
    proc = subprocess.run([sys.executable, "bench.py", *argv], cwd=HERE, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("bench.py: error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def ok(ms, **fields):
    return lambda: dict(ms=ms, peak_gib=2.0, **fields)


def fails(error):
    def work():
        raise error
    return work


def fake_results(path):
    """A Results with one row of every kind, measured through Results.measure."""
    res = bench.Results(path, ["all"])
    row = res.row("kernel", T=4096, desc="B=1 HQ=64 H=4 D=128", **{"pass": "fwd"})
    res.measure(row, "nsa", ok(1.5), flops=1.5e11)                  # 100 TFLOP/s
    res.measure(row, "flash", ok(3.0))
    res.measure(row, "cudnn", fails(RuntimeError("No available kernel. Aborting execution.")))
    for branch, ms in zip(bench.BRANCHES, (0.4, 0.3, 0.3, 0.2)):
        res.measure(row, branch, ok(ms))
        res.measure(row, f"{branch} floor", ok(0.1))
    res.measure(row, "selected loads", ok(0.1, gb=2.5, tb_per_s=25.0, neighbour_share=0.25))
    res.measure(row, "profile", lambda: {"kernels": {
        "_dense_fwd_kernel": 900.0, "_select_kernel": 400.0, "_combine_fwd_kernel": 100.0,
        "void at::native::elementwise_kernel<128, 2>(int)": 20.0}})
    row = res.row("decode", B=1, T=8192, desc="HQ=64 H=4 D=128 bf16", tokens_read=2046.0)
    res.measure(row, "nsa", ok(0.02, method="graph"), bytes=2 * 4 * 128 * 2 * 2046)
    res.measure(row, "flash", ok(0.03, method="graph"), bytes=2 * 4 * 128 * 2 * 8192)
    res.measure(row, "cudnn", ok(0.018, method="eager"), bytes=2 * 4 * 128 * 2 * 8192)
    row = res.row("generate", B=16, T=8192)
    res.measure(row, "nsa", ok(10.0, tokens_per_s=1600.0, prefill_s=1.25,
                               cache_bytes_per_token=2300.0))
    res.measure(row, "full", fails(torch.cuda.OutOfMemoryError("CUDA out of memory.\nmore")))
    row = res.row("train", T=8192, desc="8 layers")
    res.measure(row, "nsa", ok(64.0, tokens_per_s=128000.0, mfu=0.2, held_gib=1.25))
    res.measure(row, "full", ok(34.0, tokens_per_s=240941.0, mfu=0.3, held_gib=1.0))
    row = res.row("train", T=131072, desc="8 layers")
    res.measure(row, "nsa", lambda: {"peak_gib": 130.0})            # only whether a step fits
    res.measure(row, "full", fails(ValueError("bad shape")))
    return res


def test_tables(tmp_path):
    res = fake_results(None)
    entries = res.rows[0]
    assert entries["cudnn"]["status"] == "unsupported" and entries["nsa"]["status"] == "ok"
    assert res.rows[2]["full"] == {"status": "OOM", "error": "CUDA out of memory."}
    assert res.rows[4]["full"]["status"] == "error" and "bad shape" in res.rows[4]["full"]["error"]
    text = bench.all_tables(res.rows)
    assert "| 4k | fwd | 1.5 | 3 | unsupported | 2.00x | 100 | 2.0 / - |" in text
    assert "| 4k | fwd | 0.4 / 0.1 | 0.3 / 0.05 | 0.3 / 0.1 | 0.2 / 0.1 | 0.3 | 1.5 |" in text
    assert "| 4k | fwd | compressed+window | 0.9 | 63% | _dense_fwd_kernel |" in text
    assert "| 4k | fwd | other (torch ops) | 0.02 | 1% |" in text
    assert "| 4k | 0.3 | 0.1 | 2.5 | 25 | 25% |" in text
    assert "| 1 | 8k | 20 | 30 | 18* | 0.90x | 2046 / 8192 | 4.0x | 0.21 / 0.93 |" in text
    assert "| 16 | 8k | 1600 / - | - | 1.25 / - | 2300 / - |" in text
    assert ("| 8k | 64 | 34 | 128000 / 240941 | 0.53x | 20.0% / 30.0% | 1.2 / 1.0 | 2.0 / 2.0 |"
            in text)
    assert "| 128k | fits | error | - / - | - | - / - | - / - | 130.0 / - |" in text
    assert "Largest context where one step fits: nsa 128k, full 8k" in text
    for line in (ln for ln in text.splitlines() if ln.startswith("|")):
        assert line.endswith(" |")


def test_json_is_written_after_every_measurement(tmp_path):
    path = tmp_path / "bench.json"
    res = bench.Results(str(path), ["kernel", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["rows"] == [] and data["env"]["command"].startswith("python bench.py kernel")
    for key in ("git_commit", "git_dirty", "torch", "triton", "cuda", "date"):
        assert key in data["env"], key
    if os.path.isdir(os.path.join(HERE, ".git")):
        assert re.fullmatch("[0-9a-f]{40}", data["env"]["git_commit"])
        assert isinstance(data["env"]["git_dirty"], bool)
    row = res.row("train", T=8192, desc="x")
    res.measure(row, "nsa", ok(64.0))
    assert json.loads(path.read_text())["rows"] == [row] and os.listdir(tmp_path) == ["bench.json"]
    # a CUDA error ends the run; what was measured before stays in the file
    with pytest.raises(RuntimeError, match="illegal memory access"):
        res.measure(row, "full", fails(RuntimeError("CUDA error: an illegal memory access")))
    assert json.loads(path.read_text())["rows"][0]["nsa"]["ms"] == 64.0
    res = fake_results(str(path))
    assert json.loads(path.read_text()) == {"env": res.env, "rows": res.rows}


@pytest.mark.parametrize("name,group", [
    ("_select_kernel", "selection"), ("_slc_bwd_dkdv_kernel", "selected"),
    ("_combine_bwd_kernel", "gates/combine"), ("_dense_fwd_kernel", "compressed+window"),
    ("_cmp_fwd_kernel", "compressed"), ("_win_bwd_kernel", "window"),
    ("void cub::DeviceRadixSortOnesweepKernel<aggregate>(int)", "other (torch ops)")])
def test_kernel_names_map_to_branches(name, group):
    assert bench.kernel_group(name) == group


def test_plot_is_optional(tmp_path):
    path = str(tmp_path / "kernel.png")
    try:
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        with pytest.raises(common.UserError, match="--plot needs matplotlib"):
            bench.parse_args(["kernel", "--plot", path])
        return
    assert bench.parse_args(["kernel", "--plot", path]).plot == path
    bench.plot_kernel(fake_results(None).rows, path)
    assert os.path.getsize(path) > 1000


def test_peers_without_fla_print_one_line(capsys):
    try:
        from fla.ops.nsa import parallel_nsa
    except ImportError:
        assert bench.fla_kernel() is None
        assert capsys.readouterr().out.startswith("--peers: fla is not importable")
        return
    assert bench.fla_kernel() is parallel_nsa


def test_neighbour_share():
    """Of each position's selected blocks, the share the previous (or stride-back) position also
    selected: -1 entries do not count, and `counted` restricts which blocks count."""
    idx = torch.tensor([[0, 1, -1], [0, 2, 1], [3, 2, -1]])[None, :, None, :]   # [1, T=3, 1, 3]
    # t=1 shares 0, 1 of its 0, 2, 1; t=2 shares 2 of its 3, 2
    assert bench.neighbour_share(idx) == pytest.approx(3 / 5)
    assert bench.neighbour_share(idx, stride=2) == 0.0  # t=2 against t=0: none of 3, 2
    assert bench.neighbour_share(idx, counted=idx > 0) == pytest.approx(2 / 4)
