"""Tools the server never imports: benchmarks, the doctor, synthetic and
inflated test models, the memory-cgroup helper."""
