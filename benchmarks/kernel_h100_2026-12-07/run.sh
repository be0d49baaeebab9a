#!/bin/bash
# session 12, call 1: bf16 kernel tests of the dq-out + int32-sort branch, then bench.py kernel
# A/B at 64k against main's nsa_kernels.py (.devrun/nk_main.py), G = 1 and 16, and G = 2, 4 new.
# .devrun/nk_main.py was `git show d1a499d:nsa_kernels.py`; .devrun travelled with the tree (run carry).
export PYTHONUNBUFFERED=1; mkdir -p c1; start=$(date +%s); END=${END:-570}
left() { echo $(( END - ($(date +%s) - start) )); }
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a c1/timeline.txt; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > c1/gpu.txt; python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> c1/gpu.txt; cat c1/gpu.txt
rm -rf /tmp/m && mkdir /tmp/m && cp -r *.py config /tmp/m/ && cp .devrun/nk_main.py /tmp/m/nsa_kernels.py
R=$PWD
timeout 210 python -m pytest -q test_nsa.py -k kernels > c1/pytest.txt 2>&1
stamp "tests: $(tail -1 c1/pytest.txt)"
for G in 1 16; do
  timeout 110 python bench.py kernel --G $G --T 64k --json c1/new_G$G.json > c1/new_G${G}_log.txt 2>&1
  (cd /tmp/m && timeout 110 python bench.py kernel --G $G --T 64k --json $R/c1/old_G$G.json > $R/c1/old_G${G}_log.txt 2>&1)
  stamp "G=$G A/B"
done
for G in 2 4; do
  [ $(left) -gt 50 ] && timeout $(( $(left) - 10 )) python bench.py kernel --G $G --T 64k --json c1/new_G$G.json > c1/new_G${G}_log.txt 2>&1
  stamp "G=$G new"
done
python - <<'P'
import json
for G in (1, 2, 4, 16):
    for tag in ("old", "new"):
        try:
            rows = json.load(open(f"c1/{tag}_G{G}.json"))["rows"]
        except Exception as e:
            print(G, tag, "missing", e); continue
        for r in rows:
            print(f"G={G} {tag} {r['pass']:8s} nsa {r['nsa']['ms']:.2f} cudnn {r['cudnn']['ms']:.2f} "
                  f"x{r['cudnn']['ms']/r['nsa']['ms']:.2f} | " + " ".join(f"{b} {r[b]['ms']:.2f}" for b in ("compressed","selection","selected","window") if b in r))
P
tar czf $OUT/c1.tgz c1
