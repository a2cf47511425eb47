"""The paper's experiments on top of the engine: the toy demo, benchmarks, YAML sweeps and their reports."""
