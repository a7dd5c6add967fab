r"""Projection to 1B and 7B parameters on TPU slices: arithmetic, not a run.

Per-device memory and seconds per HVP of deeplanczos' layout (FSDP over the
data axis, tensor parallelism over the model axis, bases split over every
device) for models no machine here can hold, from the counts that
benchmarks/memory.py and benchmarks/large_model.py measure at small scale.

  python -m benchmarks.projection

Writes benchmarks/results/projection.md.
"""

from benchmarks import common

# Per device, with N devices, the model axis M, b bytes per parameter, a
# basis of ncv + 1 vectors: stored (parameters, v, Hv, basis) split N ways;
# during a product, the parameters and v gathered over the data axis, float32
# partial sums and the HVP's tangents, each split M ways.
CHIPS = {"TPU v4": (275e12, 32), "TPU v5e": (197e12, 16),
         "TPU v5p": (459e12, 95)}


def main(tokens=2**20, ncv=20, mfu=0.4):
  rows = []
  for params, b, name, devices, model in (
      (1e9, 4, "TPU v4", 32, 4), (1e9, 2, "TPU v5e", 64, 4),
      (7e9, 2, "TPU v4", 64, 8), (7e9, 2, "TPU v5p", 64, 8),
      (7e9, 4, "TPU v5p", 128, 8)):
    stored = (3 + ncv + 1) * params * b / devices
    transient = (2 * b + 4 + 2 * b) * params / model
    flops = 8 * params * tokens
    peak, hbm = CHIPS[name]
    seconds = flops / (devices * peak * mfu)
    rows.append([f"{params / 1e9:.0f}B", f"{'bf16' if b == 2 else 'f32'}",
                 f"{name} x {devices}", f"data={devices // model}, "
                 f"model={model}", f"{stored / 2**30:.1f}",
                 f"{transient / 2**30:.1f}", f"{hbm}",
                 f"{seconds:.1f}", f"{seconds * 3 * ncv / 60:.0f}"])
  common.write("projection", "Projection to 1B and 7B parameters", (
      "Computed, not measured (no TPU was lent): per-device "
      "GiB and seconds per HVP over a pass of 2^20 tokens, for a Lanczos "
      f"basis of ncv={ncv}, FSDP over the data axis and tensor parallelism "
      "over the model axis. Stored: parameters, v, Hv and the basis, split "
      "over all devices. Transient, during a product: the parameters and v "
      "gathered over the data axis, float32 partial sums and the HVP's "
      "tangents, split over the model axis only; activations come on top. "
      f"HVP = 8 x parameters flops per token at {mfu:.0%} of the chip's "
      "bf16 peak; a Lanczos run of 3 x ncv products.\n\n" + common.table(
          ["parameters", "dtype", "slice", "mesh", "stored GiB/device",
           "transient GiB/device", "HBM GiB", "s per HVP",
           "Lanczos minutes"], rows) +
      "\n\nThe transient column is the limit: at 7B in float32 it needs the "
      "model axis at 8 or more; the basis is what FSDP removes (it would be "
      "21 x 28 GB / 8 = 68 GiB per device split over the model axis alone)."))




if __name__ == "__main__":
  main()
