"""Tools beside the front-ends: `gen eval --task img2img|inpaint` (eval_images.py; text-to-image's is gen.evaluation),
`gen bench` (bench.py, bench_sd.py), `gen bench --serve` and the soak test (serve_bench.py, serve_soak.py)."""
