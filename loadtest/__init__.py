"""Load tests, benchmarks and evaluations, run from the repository root (the Makefile's targets).

- `locustfile.py`: the locust load test (`make loadtest`), with its helpers `synthetic.py` (catalog-like
  vectors) and `phone_photos.py` (photos as phones send them);
- `benchmarks/`: speed, each against a peer measured in the same run (`python -m loadtest.benchmarks.NAME`);
- `evaluations/`: search quality of candidate settings (`python -m loadtest.evaluations.NAME`).
"""
