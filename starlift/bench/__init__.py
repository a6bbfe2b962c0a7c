"""Benchmarks as commands: speed against peers (``speed``), where a step's time goes (``profile``),
and the peers' own drivers (``optimum_worker`` runs in optimum-onnx's venv)."""
