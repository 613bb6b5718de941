"""segassist: self-hosted annotation assistant for medical imaging research units.

One installed namespace; its subpackages keep their folders at the repository's top level
(``segassist/<name>`` links to ``<name>/``):

- :mod:`segassist.client` — REST client and the ``segassist`` CLI (base install);
- :mod:`segassist.server` — FastAPI service, database, datastore, viewers' APIs (``[server]``);
- :mod:`segassist.models` — networks, losses, pretraining, few-shot fitting, ONNX export
  (``[worker]``), and :mod:`segassist.models.runtime`, the torch-free ONNX Runtime predictor;
- :mod:`segassist.worker` — Celery workers running the jobs (``[worker]``);
- :mod:`segassist.bench` — benchmarks (``[bench]``).
"""
