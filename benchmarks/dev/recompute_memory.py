"""Dev: training step time and memory of NSA with each RECOMPUTE choice, and full attention."""
import json, os, sys
sys.path.insert(0, os.getcwd())
import torch, bench, common, nsa_kernels as nk
fields = bench.model_fields(bench.TRAIN_CONFIG)
peak = common.peak_bf16_flops(torch.cuda.get_device_name())
out = []
for T in (8192, 32768, 65536):
    for attention, rc in [("full", None), ("nsa", ()), ("nsa", ("window",)),
                          ("nsa", ("compressed", "window"))]:
        if rc is not None:
            nk.RECOMPUTE = rc
        r = bench.train_speed(fields, attention, T, 3, peak)
        r.update(T=T, attention=attention, recompute=rc)
        print(json.dumps(r), flush=True)
        out.append(r)
        torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "mem.json"), "w"), indent=1)
