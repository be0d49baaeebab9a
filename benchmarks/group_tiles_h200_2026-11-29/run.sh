#!/bin/bash
# session 11, call 3: A/B of the group-size tiles (selected and compressed dk/dv at G < 16) at 64k,
# G = 1, 4, 8, against HEAD's nsa_kernels.py (.devrun/nk_main.py) in the same run; then the bf16
# kernel tests at G < 16; then the never-swept key-block forward (and G = 1, 8 dk/dv) settings.
export PYTHONUNBUFFERED=1; mkdir -p c3; start=$(date +%s); END=${END:-420}
left() { echo $(( END - ($(date +%s) - start) )); }
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a c3/timeline.txt; }
rm -rf /tmp/m && mkdir /tmp/m && cp -r *.py config /tmp/m/ && cp .devrun/nk_main.py /tmp/m/nsa_kernels.py
R=$PWD
for G in 1 4 8; do
  timeout 70 python bench.py kernel --G $G --T 64k --json c3/new_G$G.json > c3/new_G${G}_log.txt 2>&1
  (cd /tmp/m && timeout 70 python bench.py kernel --G $G --T 64k --json $R/c3/old_G$G.json > $R/c3/old_G${G}_log.txt 2>&1)
  stamp "G=$G A/B"
done
timeout $(( $(left) - 140 )) python -m pytest -q test_nsa.py -k "(kernels_nsa_matches or branch_functions or selection) and not G16 and not G32" > c3/pytest.txt 2>&1
stamp "tests: $(tail -1 c3/pytest.txt)"
timeout $(( $(left) - 10 )) python benchmarks/dev/tiles.py --out c3/tiles.jsonl --kernels selected.dkdv,selected.blocks_fwd,compressed.dkdv --cases 65536:1,65536:8 > c3/tiles_log.txt 2>&1
stamp "sweep: $(grep -c '"ms"' c3/tiles.jsonl) timed"
python - <<'P'
import json
for G in (1, 4, 8):
    for tag in ("old", "new"):
        try:
            rows = json.load(open(f"c3/{tag}_G{G}.json"))["rows"]
        except Exception as e:
            print(G, tag, "missing", e); continue
        for r in rows:
            print(f"G={G} {tag} {r['pass']:8s} nsa {r['nsa']['ms']:.2f} cudnn {r['cudnn']['ms']:.2f} "
                  f"x{r['cudnn']['ms']/r['nsa']['ms']:.2f} | " + " ".join(f"{b} {r[b]['ms']:.2f}" for b in ("compressed","selection","selected","window") if b in r))
P
tar czf $OUT/c3.tgz c3
