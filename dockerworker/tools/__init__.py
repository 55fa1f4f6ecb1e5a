"""The runtime's benchmarks and tools: run from a checkout, never shipped in the image.

- `bench`       the throughput benchmark against a real broker, beside `limitclient`
- `limitclient` the least a worker can do per message: the benchmark's yardstick
- `startbench`  container start → consuming, per image (the start-up benchmark)
- `idlebench`   what N idle workers cost: container, engine and machine CPU, memory
- `restbench`   the floors, start → consuming and idle workers under the daemon, in one run

Nothing in the runtime imports from here (`.dockerignore` keeps the folder
out of the image); `bench` runs `limitclient` inside a worker image by
mounting this folder into the container.
"""
