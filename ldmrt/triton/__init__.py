"""Triton Inference Server: a model repository generated from a bundle, and a local test server.

- `config`: Triton model configurations (config.pbtxt) derived from the bundle's I/O specs.
- `repository`: `write_repository(bundle, out, options)`, what `ldmrt triton` runs.
- `ownership`: which model folders of a shared repository ldmrt wrote (a marker per model), so
  `--force` replaces only those, untouched.
- `pipeline_model`: the Python-backend model (copied as `model.py`) that runs ldmrt's Pipeline.
- `pipeline_io`: its request and response tensors, declared once (config, model.py, client, check).
- `adapters`: the LoRA adapters it may load (`--lora NAME=FILE[:SCALE]`) and a request's `lora` choice.
- `probe`: the liveness probe shipped as `<pipeline>/probe.py` (standard library only).
- `check`: parses every config.pbtxt with Triton's own protobuf (needs `tritonclient`) and
  compares it with the manifest.
- `server`, `client`: start a tritonserver from a PyTriton environment on localhost; send requests.

Nothing here imports torch; `check` and `client` import `tritonclient` and run in the
environment scripts/triton_env.sh creates.
"""
