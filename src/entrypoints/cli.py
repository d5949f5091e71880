"""The ``voxcore`` command line: load fragments, probe the cache and the LLM, run the offline demo.

Commands: ``load-audio``, ``probe-cache``, ``demo``, ``probe-llm``, ``probe-agent``, ``sandbox``
(``voxcore COMMAND --help`` shows each one's options with their defaults; ``voxcore --version``).

Every command prints JSON lines on stdout; an error is also written to stderr as one
``voxcore: error: ...`` line, and the exit code is non-zero. Redis is found in this order: ``--redis-url``;
``--embedded-redis``; the configured location (config file, ``REDIS_URL``/``REDIS_HOST``...);
a server answering on 127.0.0.1:6379; otherwise a ``redis-server`` from PATH started on a free
loopback port for the run (announced with ``embedded_redis_started``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from voxcore.core.domain.keys import static_key
from voxcore.core.ports.errors import ConfigurationError
from voxcore.entrypoints import demo, llm_cli
from voxcore.entrypoints.container import Container
from voxcore.entrypoints.manifest import numbers_manifest_path, read_manifest
from voxcore.entrypoints.runtime import open_runtime
from voxcore.events import emit

log = logging.getLogger("voxcore.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def example_wav() -> Path:
    """Path of the shipped example: Russian speech by espeak-ng (16 kHz mono 16-bit, ~3 s)."""
    return Path(str(resources.files("voxcore.entrypoints") / "assets" / "example.wav"))


def demo_manifest() -> Path:
    """Path of the shipped demo fragment manifest (greeting, intro, one_moment, test_example)."""
    return Path(str(resources.files("voxcore.entrypoints") / "assets" / "manifest.yml"))


def numbers_manifest() -> Path:
    """Path of the shipped number fragment pack's manifest (one word per fragment)."""
    return numbers_manifest_path()


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (``--help`` is the reference of the flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
            and not isinstance(action, argparse._VersionAction | argparse._HelpAction)
        ):
            text = f"{text} (default: %(default)s)".strip()
        return text


class _Parser(argparse.ArgumentParser):
    """Every ``voxcore`` (sub)command parser: the defaults-showing help formatter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _document_defaults(parser: argparse.ArgumentParser) -> None:
    """Give options without a help text one, so ``--help`` lists them with their default."""
    for action in parser._actions:
        if action.help is None and action.option_strings and action.default not in (None, False):
            action.help = "(default: %(default)s)"
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _document_defaults(child)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``voxcore`` command."""
    from voxcore import __version__

    lines = (__doc__ or "").splitlines()
    parser = _Parser(prog="voxcore", description="\n".join(lines[:4]).replace("``", ""))
    parser.add_argument("--version", action="version", version=f"voxcore {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--config", type=Path, help="YAML settings file (default: defaults + environment)")
    where = common.add_mutually_exclusive_group()
    where.add_argument("--redis-url", help="use this Redis (overrides the configuration)")
    where.add_argument(
        "--embedded-redis", action="store_true", help="always start a private redis-server for this run"
    )
    common.add_argument(
        "--log-level",
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="JSON log lines on stdout from this level (default: the command's, usually INFO)",
    )
    common.add_argument(
        "--telemetry",
        action="store_true",
        help="export traces and metrics over OTLP for this run (telemetry.enabled; the OTEL_* "
        "variables apply, e.g. OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    load = sub.add_parser(
        "load-audio",
        parents=[common],
        help="load WAV fragments into static:* keys",
        description="Load every *.wav of DIR as static:<file stem>, or the fragments a manifest "
        "(YAML/JSON: fragments: [{key, file, transcript}]) lists. Bad files are reported and skipped.",
    )
    load.add_argument("source", type=Path, metavar="DIR|MANIFEST")
    load.add_argument("--chunk-ms", type=int, default=20)
    load.set_defaults(handler=_load_audio)

    probe = sub.add_parser(
        "probe-cache",
        parents=[common],
        help="manual end-to-end check of the cache (SPEC-C), JSON lines only",
    )
    probe.add_argument("--key", default="static:test_example")
    probe.add_argument("--wav", type=Path, default=None, help="WAV to load (default: the shipped example)")
    probe.add_argument("--chunk-ms", type=int, default=20)
    probe.add_argument("--concurrency", type=int, default=5)
    probe.add_argument("--rounds", type=int, default=10, help="concurrent read rounds for p50/p95")
    probe.add_argument("--text-ttl", type=float, default=2.0, help="seconds (whole) for the TTL check")
    probe.set_defaults(handler=_probe_cache)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="offline demo: shipped fragments, probe-cache, a short dialogue (private Redis, LLM simulator)",
    )
    demo.add_argument(
        "--fragments", type=Path, default=None, help="manifest or WAV folder (default: shipped)"
    )
    demo.add_argument("--chunk-ms", type=int, default=20)
    demo.add_argument("--report-dir", type=llm_cli.absolute_path, default=llm_cli.absolute_path("reports"))
    demo.set_defaults(handler=_demo)

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="live events over SSE and the call dashboard (uvicorn; needs the web extra)",
        description="Serve GET /calls/{session_id}/events (SSE with exact resume), GET /index/events and "
        "the dashboard at /dashboard until Ctrl-C. Prints serve_ready with the dashboard URL "
        "(operator token).",
    )
    serve.add_argument("--host", default=None, help="address to bind (default: events.host, 127.0.0.1)")
    serve.add_argument(
        "--port", type=int, default=None, help="port (default: events.port, 8765; 0: a free one)"
    )
    serve.add_argument(
        "--embedded-redis-dir",
        type=llm_cli.absolute_path,
        default=None,
        help="when a private redis-server is started, keep its data here (e.g. reports/.demo-redis)",
    )
    serve.set_defaults(handler=_serve)

    llm_cli.register(sub, common)
    _document_defaults(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``voxcore`` console script."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.handler
    if getattr(args, "telemetry", False):
        os.environ["VOXCORE_TELEMETRY__ENABLED"] = "true"  # this process only: read by load_settings
    try:
        return asyncio.run(handler(args))
    except ConfigurationError as exc:
        _print_json({"event": "error", "error": str(exc)})  # and on stderr
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


# -- shared plumbing ------------------------------------------------------------------------------


def _print_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()
    if payload.get("event") == "error" and "error" in payload:
        _print_error(str(payload["error"]))


def _print_error(message: str) -> None:
    """The human-readable copy of an error, on stderr (stdout stays JSON lines)."""
    sys.stderr.write(f"voxcore: error: {message}\n")
    sys.stderr.flush()


@asynccontextmanager
async def _cache_container(args: argparse.Namespace, default_level: str) -> AsyncIterator[Container]:
    """Settings -> Redis location -> container with a connected cache; JSON logs on stdout."""
    async with open_runtime(
        config=args.config,
        log_level=args.log_level or default_level,
        redis_url=args.redis_url,
        embedded_redis=args.embedded_redis,
    ) as runtime:
        yield runtime.container


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return round(ordered[rank - 1], 3)


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)


# -- load-audio -----------------------------------------------------------------------------------


def _fragments_from(source: Path) -> list[tuple[str, Path]]:
    """(key, file) pairs from a directory of WAVs or a manifest file."""
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() == ".wav" and p.is_file())
        if not files:
            raise ConfigurationError(f"no *.wav files in directory {source}")
        return [(static_key(p.stem), p) for p in files]
    if source.is_file():
        return [(spec.key, Path(spec.file)) for spec in read_manifest(source)]
    raise ConfigurationError(f"{source} is neither a directory nor a manifest file")


async def _load_audio(args: argparse.Namespace) -> int:
    fragments = _fragments_from(args.source)
    async with _cache_container(args, "INFO") as container:
        return await _load_fragments(container, fragments, args.chunk_ms, str(args.source))


async def _load_fragments(
    container: Container, fragments: list[tuple[str, Path]], chunk_ms: int, source: str
) -> int:
    """Load (key, file) pairs with a progress display on stderr and a JSON summary on stdout."""
    cache = container.cache()
    if not await cache.ping():
        _print_json({"event": "error", "error": f"Redis at {cache.config.describe()} does not answer"})
        return EXIT_FAILED
    started = time.perf_counter()
    loaded, failures, total_chunks = 0, [], 0
    for index, (key, path) in enumerate(fragments, 1):
        result = await cache.load_audio_file(key, str(path), chunk_ms)
        status = f"ok, {result.chunks} chunks, {result.duration_ms:.0f} ms" if result.ok else result.reason
        sys.stderr.write(f"[{index}/{len(fragments)}] {key} <- {path.name}: {status}\n")
        if result.ok:
            loaded += 1
            total_chunks += result.chunks
        else:
            failures.append({"key": key, "file": str(path), "reason": result.reason})
    _print_json(
        {
            "event": "load_audio_summary",
            "source": source,
            "fragments": len(fragments),
            "loaded": loaded,
            "failed": len(failures),
            "chunks": total_chunks,
            "elapsed_ms": _ms(started, time.perf_counter()),
            "failures": failures,
        }
    )
    return EXIT_OK if not failures else EXIT_FAILED


# -- probe-cache ----------------------------------------------------------------------------------


async def _probe_cache(args: argparse.Namespace) -> int:
    if args.concurrency < 1 or args.rounds < 1:
        raise ConfigurationError("--concurrency and --rounds must be at least 1")
    async with _cache_container(args, "DEBUG") as container:
        return await _probe(container, args)


async def _probe(container: Container, args: argparse.Namespace) -> int:
    """SPEC-C's manual e2e test: warm-up, hit, miss, text TTL and expiry, concurrent streaming reads."""
    wav = args.wav or example_wav()
    checks: dict[str, bool] = {}
    cache = container.cache()
    if not await cache.ping():
        _print_json({"event": "error", "error": f"Redis at {cache.config.describe()} does not answer"})
        return EXIT_FAILED
    # 1. warm-up (the cache logs warmup_done)
    checks["warmup"] = await cache.load_and_set_audio(args.key, str(wav), args.chunk_ms)
    # 2. hit and 3. miss (the cache logs get_audio_chunks_hit/_miss with latency_ms)
    chunks = await cache.get_audio_chunks(args.key)
    checks["hit"] = bool(chunks)
    checks["miss"] = await cache.get_audio_chunks(f"{args.key}:__probe_missing__") is None
    # 4. text with a TTL, then expiry
    ttl = max(1, round(args.text_ttl))
    text_key = "summary:session:probe-cache"
    checks["text_set"] = await cache.set_text(text_key, "проверка TTL", ttl)
    checks["text_get"] = await cache.get_text(text_key) == "проверка TTL"
    emit(log, "text_roundtrip", key=text_key, ttl_seconds=ttl, ok=checks["text_set"] and checks["text_get"])
    await asyncio.sleep(ttl + 0.2)
    checks["text_expired"] = await cache.get_text(text_key) is None
    emit(log, "text_expiry", key=text_key, waited_s=ttl + 0.2, expired=checks["text_expired"])
    # 5. concurrent streaming reads
    samples: list[dict[str, float]] = []
    for _ in range(args.rounds):
        results = await asyncio.gather(
            *(_bench_stream_read(cache, args.key) for _ in range(args.concurrency))
        )
        samples += [r for r in results if r is not None]
    checks["bench"] = len(samples) == args.rounds * args.concurrency
    if samples:
        summary = {
            f"{metric}_{name}": _percentile([s[metric] for s in samples], q)
            for metric in ("first_chunk_ms", "stream_ms", "total_ms")
            for name, q in (("p50", 50), ("p95", 95))
        }
        emit(log, "bench_summary", key=args.key, reads=len(samples), concurrency=args.concurrency, **summary)
    ok = all(checks.values())
    _print_json({"event": "probe_done", "ok": ok, "checks": checks})
    return EXIT_OK if ok else EXIT_FAILED


async def _demo(args: argparse.Namespace) -> int:
    """Offline demo: private Redis and the LLM simulator (unless configured), the shipped fragments,
    the cache probe, a short dialogue with dual context and the summary cache, then a simulated call
    with hybrid replies rendered to a WAV file (md/json reports; their paths are printed)."""
    started = time.time()
    if args.redis_url is None:
        args.embedded_redis = True
    # The demo fragments (or the ones given) and the number pack, so amounts play from recordings.
    fragments = _fragments_from(args.fragments or demo_manifest()) + _fragments_from(numbers_manifest())
    probe_args = argparse.Namespace(
        key="static:test_example", wav=None, chunk_ms=args.chunk_ms, concurrency=5, rounds=10, text_ttl=2.0
    )
    # Tokens of the dashboard stay valid for a later `voxcore serve` on the demo's data: the demo keeps
    # its events secret beside its Redis data (unless one is configured).
    secret_file = demo_events_secret(args.report_dir / ".demo-redis")
    async with open_runtime(
        config=args.config,
        log_level=args.log_level or "INFO",
        redis_url=args.redis_url,
        embedded_redis=args.embedded_redis,
        use_llm=True,
        # The demo's private Redis keeps its data beside the reports, so a second run plays the
        # synthesized parts from the TTS cache the first run filled.
        embedded_data_dir=args.report_dir / ".demo-redis",
    ) as runtime:
        demo.check_voice(runtime)  # no espeak-ng and no provider: one clear line, before any work
        loaded = await _load_fragments(
            runtime.container, fragments, args.chunk_ms, str(args.fragments or "shipped")
        )
        probed = await _probe(runtime.container, probe_args)
        async with _demo_dashboard(runtime) as dashboard:
            talked = await llm_cli.demo_dialogue(runtime, report_dir=args.report_dir)
            if talked:  # a provider error: one JSON `error` line was printed; the call would repeat it
                return talked
            source = args.fragments or demo_manifest()
            specs = (read_manifest(source) if source.is_file() else []) + read_manifest(numbers_manifest())
            with llm_cli.llm_errors_exit() as code:
                call = await demo.simulated_call(runtime, report_dir=args.report_dir, specs=specs)
            if code[0]:
                return code[0]
        later: tuple[str, str] | None = None
        if dashboard is not None and secret_file is not None and args.redis_url is None:
            from voxcore.entrypoints.web import dashboard_url

            port = runtime.settings.events.port
            later = (
                f"VOXCORE_EVENTS__SECRET=$(cat {secret_file}) voxcore serve "
                f"--embedded-redis-dir {args.report_dir / '.demo-redis'} --port {port}",
                dashboard_url("127.0.0.1", port, runtime.container.operator_token()),
            )
    files = sorted(
        str(p) for p in args.report_dir.glob("*") if p.is_file() and p.stat().st_mtime >= started
    )  # fmt: skip
    _print_json({"event": "demo_done", "call_audio": call["wav"], "files": files, "dashboard": dashboard})
    sys.stderr.write("demo output:\n" + "".join(f"  {f}\n" for f in files))
    if dashboard is not None:
        sys.stderr.write(f"dashboard of the demo's calls (served while the demo ran):\n  {dashboard}\n")
    if later is not None:
        sys.stderr.write(f"to browse them again (the demo's Redis keeps them):\n  {later[0]}\n  {later[1]}\n")
    return loaded or probed or talked


def demo_events_secret(folder: Path) -> Path | None:
    """Set ``VOXCORE_EVENTS__SECRET`` for the demo from ``folder/events.secret`` (made once) unless set."""
    if os.environ.get("VOXCORE_EVENTS__SECRET"):
        return None
    path = folder / "events.secret"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32) + "\n", encoding="utf-8")
        path.chmod(0o600)
    os.environ["VOXCORE_EVENTS__SECRET"] = path.read_text(encoding="utf-8").strip()
    return path


@asynccontextmanager
async def _demo_dashboard(runtime: Any) -> AsyncIterator[str | None]:
    """The dashboard served while the demo runs (``None`` without the web extra or live events)."""
    if not runtime.settings.events.enabled:
        yield None
        return
    try:
        from voxcore.entrypoints.serve import serving_in_background
    except ImportError:  # the web extra is not installed: the demo runs without its dashboard
        reason = "the web extra (starlette, sse-starlette, uvicorn) is missing"
        emit(log, "demo_dashboard_skipped", reason=reason)
        yield None
        return
    async with serving_in_background(runtime) as url:
        emit(log, "demo_dashboard", url=url)
        sys.stderr.write(f"dashboard (live while the demo runs): {url}\n")
        yield url


async def _serve(args: argparse.Namespace) -> int:
    """Run the live events server until SIGINT/SIGTERM."""
    try:
        from voxcore.entrypoints.serve import serve
    except ImportError as exc:  # the web extra is not installed
        raise ConfigurationError(
            f"voxcore serve needs the web extra (pip install 'voxcore[web]'): {exc}"
        ) from exc
    async with open_runtime(
        config=args.config,
        log_level=args.log_level or "INFO",
        redis_url=args.redis_url,
        embedded_redis=args.embedded_redis or args.embedded_redis_dir is not None,
        embedded_data_dir=args.embedded_redis_dir,
    ) as runtime:
        events = runtime.settings.events
        host = args.host or events.host
        port = events.port if args.port is None else args.port
        await serve(runtime, host=host, port=port)
    return EXIT_OK


async def _bench_stream_read(cache: Any, key: str) -> dict[str, float] | None:
    """One streaming read: time to first chunk, time to stream the rest, total (SPEC-C bench)."""
    t0 = time.perf_counter()
    stream = await cache.open_audio_stream(key)
    if stream is None:
        emit(log, "bench_read_miss", key=key, latency_ms=_ms(t0, time.perf_counter()))
        return None
    nbytes = chunks = 0
    t_first = t0
    async with stream:
        async for chunk in stream:
            if not chunks:
                t_first = time.perf_counter()
            chunks += 1
            nbytes += len(chunk)
    t_end = time.perf_counter()
    sample = {
        "first_chunk_ms": _ms(t0, t_first),
        "stream_ms": _ms(t_first, t_end),
        "total_ms": _ms(t0, t_end),
    }
    emit(log, "bench_read_ok", key=key, bytes=nbytes, chunks=chunks, **sample)
    return sample


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
