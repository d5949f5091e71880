"""Run the OpenAI-compatible SIMULATOR standalone: ``python -m voxcore.simulator --port 8089``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence

from voxcore.simulator.openai_server import DEFAULT_MODELS, OpenAISimulator


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m voxcore.simulator",
        description="Local OpenAI-compatible API SIMULATOR (scripted answers, no real model).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8089, help="port to bind; 0 picks a free one")
    parser.add_argument("--api-key", default="sk-simulator", help="expected bearer key")
    parser.add_argument("--no-auth", action="store_true", help="accept requests without a key")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model ids")
    parser.add_argument("--first-token-ms", type=float, default=0.0, help="delay before the first byte")
    parser.add_argument("--inter-chunk-ms", type=float, default=0.0, help="delay between streamed chunks")
    parser.add_argument("--chars-per-chunk", type=int, default=6, help="characters per content delta")
    parser.add_argument("--early-headers", action="store_true", help="send stream headers before the delay")
    parser.add_argument("--reply", default=None, help="constant reply text (default: echo the user)")
    parser.add_argument("--embedding-ms", type=float, default=0.0, help="delay before an embeddings answer")
    parser.add_argument(
        "--idle-timeout-s", type=float, default=75.0, help="close keep-alive connections idle this long"
    )
    parser.add_argument(
        "--llama-cpp",
        action="store_true",
        help="behave like llama.cpp's server: one request at a time (a waiting request ends the running "
        "stream), json_schema refused with a 500, idle connections closed after 5 s without a Keep-Alive "
        "header",
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    sim = OpenAISimulator(
        host=args.host,
        port=args.port,
        api_key=None if args.no_auth else args.api_key,
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        reply=args.reply,
        first_token_delay_ms=args.first_token_ms,
        inter_chunk_delay_ms=args.inter_chunk_ms,
        chars_per_chunk=args.chars_per_chunk,
        early_headers=args.early_headers,
        embedding_delay_ms=args.embedding_ms,
        idle_timeout_s=5.0 if args.llama_cpp else args.idle_timeout_s,
        one_request_at_a_time=args.llama_cpp,
        response_formats=("text", "json_object") if args.llama_cpp else None,
        keep_alive_header=not args.llama_cpp,
    )
    async with sim:
        started = {
            "event": "simulator_started",
            "base_url": sim.base_url,
            "api_key": sim.api_key,
            "models": sim.models,
            "admin": f"http://{sim.host}:{sim.port}/_simulator/",
        }
        print(json.dumps(started), flush=True)
        await stop.wait()
        stats = sim.stats()
    print(json.dumps({"event": "simulator_stopped", **stats}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGINT/SIGTERM; returns the process exit code."""
    args = _parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass
    except OSError as err:
        print(json.dumps({"event": "simulator_failed", "error": str(err)}), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
