"""Triton Inference Server: a model repository generated from a bundle, and a local test server.

- `config`: Triton model configurations (config.pbtxt) derived from the bundle's I/O specs.
- `repository`: `write_repository(bundle, out, options)`, what `ldmrt triton` runs.
- `pipeline_model`: the Python-backend model (copied as `model.py`) that runs ldmrt's Pipeline.
- `check`: parses every config.pbtxt with Triton's own protobuf (needs `tritonclient`) and
  compares it with the manifest.
- `server`, `client`: start a tritonserver from a PyTriton environment on localhost; send requests.

Nothing here imports torch; `check` and `client` import `tritonclient` and run in the
environment scripts/triton_env.sh creates.
"""
