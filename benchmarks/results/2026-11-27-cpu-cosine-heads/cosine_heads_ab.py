"""Eval forward of ride_resnet50_3e with the heads' unit-length class vectors kept (the library) or
normalised in every forward (as before commit "NormedLinear keeps ..."), interleaved in one process.

    python benchmarks/results/2026-11-27-cpu-cosine-heads/cosine_heads_ab.py NUM_CLASSES BATCH ITERS
"""

import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F

from ride_models.models.ride_resnet import NormedLinear

torch.set_num_threads(2)
torch.manual_seed(0)
kept = NormedLinear._unit_weight


def every_forward(self, x):
    return F.normalize(self.weight, dim=1)


num_classes, batch, iters = (int(a) for a in sys.argv[1:4])
model = timm.create_model("ride_resnet50_3e", num_classes=num_classes).eval()
model = model.to(memory_format=torch.channels_last)
x = torch.randn(batch, 3, 224, 224).to(memory_format=torch.channels_last)
times = {}
with torch.inference_mode():
    for _ in range(7):
        for label, unit_weight in (("kept", kept), ("every forward", every_forward)):
            NormedLinear._unit_weight = unit_weight
            for mode, run in (("all experts", lambda: model(x)), ("routed", lambda: model.route(x))):
                run()
                start = time.perf_counter()
                for _ in range(iters):
                    run()
                times.setdefault(f"{label}, {mode}", []).append((time.perf_counter() - start) / iters * 1e3)
print(f"ride_resnet50_3e, {num_classes} classes, batch {batch}, ms per forward (median of 7 rounds):")
for key, values in times.items():
    print(f"  {key}: {statistics.median(values):.1f}")
