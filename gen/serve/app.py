"""The server: create_app(config) puts the APIs, the page, errors and middleware on one FastAPI app; serve(config)
runs it under uvicorn with a graceful SIGTERM (stop accepting, finish the running batch, answer the queue 503,
exit 0)."""

from __future__ import annotations

import logging
import signal
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

import gen
from gen.serve import a1111, controlnet, errors, jobs, openai_images, page, schema, upscaling
from gen.serve.config import ServeConfig
from gen.serve.middleware import Auth, BodyLimit
from gen.serve.models import Models
from gen.serve.state import State

logger = logging.getLogger(__name__)


def create_app(config: ServeConfig, models: Models | None = None) -> FastAPI:
    """The app; `models` already loaded (tests share them between apps) or loaded here from config.models."""
    config.check()
    why = config.resolve_precision()
    logger.info("precision: %s%s", config.dtype, f" ({why})" if why else "")
    models = models or Models.load(
        config.models,
        config.device,
        config.dtype,
        config.attention,
        config.backend,
        config.bases,
        config.text_encoders,
        config.vae,
    )
    state = State(config, models)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        yield
        await state.stop()

    app = FastAPI(title="gen", version=gen.__version__, lifespan=lifespan)
    app.state.gen = state
    errors.install(app)
    schema.document(app, config)
    app.include_router(a1111.router(state))
    app.include_router(upscaling.router(state))
    app.include_router(controlnet.router(state))
    app.include_router(openai_images.router(state))
    app.include_router(jobs.router(state))
    app.include_router(page.router())
    # Added innermost first: CORS answers preflights before auth asks for credentials a browser never sends there.
    app.add_middleware(BodyLimit, limit=config.max_body)
    app.add_middleware(Auth, credentials=config.credentials(), api_key=config.api_key)
    if config.cors:
        app.add_middleware(
            CORSMiddleware, allow_origins=config.cors, allow_methods=["*"], allow_headers=["*"]
        )
    return app


class Server(uvicorn.Server):
    """uvicorn, plus: at SIGTERM/SIGINT the queue stops taking work and answers queued requests 503 at once, so
    uvicorn's wait for open connections ends when the running batch does."""

    def __init__(self, config: uvicorn.Config, state: State):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame) -> None:
        self.state.close_threadsafe()
        super().handle_exit(sig, frame)


def serve(config: ServeConfig) -> int:
    app = create_app(config)
    server = Server(
        uvicorn.Config(
            app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=None
        ),
        app.state.gen,
    )
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_auth:
        logger.warning("listening on %s without --api-auth: anyone who can reach it can use it", config.host)
    # uvicorn re-raises a caught SIGTERM or SIGINT after its graceful stop, which would end the process with
    # status 143 or 130; the stop was clean, so that second delivery is ignored and we exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0
