r"""The top 5 Hessian eigenpairs of the digits CNN, by thick-restart Lanczos.

The CNN of configs/cnn_digits.py, trained the same way; Lanczos keeps at most
20 basis vectors and stops when every pair's relative residual is below 1e-6.
`--config.lanczos.which=SA` gives the most negative curvature instead.

Run:
  python launch/main.py --config=configs/cnn_digits_lanczos.py --workdir=/tmp/cnn_lanczos

It logs `lanczos on cnn_digits: Hessian LA eigenvalues [46.068562 29.911081
23.041492 19.229248 13.989552]` (20 s on 2 idle CPU cores) and writes result.json
(eigenvalues, residuals, Ritz history) and lanczos.png into the workdir.
"""

from deeplanczos import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.task = "cnn_digits"
  c.method = "lanczos"
  c.model.channels = (16, 32)
  c.model.hidden = 64
  c.lanczos.k = 5
  c.lanczos.which = "LA"
  c.lanczos.ncv = 20
  c.lanczos.tol = 1e-6
  if arg == "small":
    c.model.channels = (4, 8)
    c.model.hidden = 16
    c.train.steps = 50
    c.lanczos.k = 3
    c.lanczos.ncv = 8
    c.lanczos.max_hvps = 30
  return c
