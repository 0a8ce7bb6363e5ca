"""`gen serve`, the second front-end: the HTTP APIs clients already speak, over the generation core, behind one
queue that batches compatible requests into one pipeline call.

config.py      ServeConfig: what `gen serve` was started with (torch-free, so the CLI can check it cheaply)
models.py      the served models: loaded once, named, titled and hashed as A1111 lists checkpoints
tasks.py       a request as a Task (options + (prompt, seed) jobs), built and checked in one place for every API
queue.py       the one worker: batching, progress, cancel and interrupt, 429 when full, graceful shutdown
results.py     images to PNG bytes carrying the CLI's metadata; base64 and data: URLs in
sampler_names.py  A1111 sampler and scheduler names and aliases (gen.diffusion.samplers maps gen's to diffusers)
state.py       what a running server holds (queue, A1111 options, native jobs); queue-and-wait with hang-up
store.py       where native jobs are kept: memory, or SQLite + PNG files that survive a crash (--state-dir)
errors.py      one-line JSON errors (OpenAI's error shape under /v1)
middleware.py  HTTP Basic / Bearer auth (401 before routing) and the request body limit
a1111.py, openai_images.py, jobs.py   the three APIs; page.py and page/ the web page at /
app.py         create_app(config), serve(config)
"""
