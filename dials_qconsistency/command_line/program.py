"""What every command of this package shares: the command line, the log, checks
on output paths and the exit statuses (standalone backend).

Arguments follow DIALS programs: files by extension, ``.phil`` files and
``key=value`` words for the PHIL scope, ``-c`` to show the configuration and
``-h`` for help. Errors are one line naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import re
import signal
import sys
import traceback

import libtbx.phil
from threadpoolctl import threadpool_limits

from dials_qconsistency.io import backends
from dials_qconsistency.errors import GateFailed, QConsistencyError

EXPERIMENT_EXTENSIONS = (".expt", ".json")
REFLECTION_EXTENSIONS = (".refl",)


class Arguments:
    """A parsed command line: the extracted parameters, the input files by kind, the flags.

    ``backend`` is the resolved backend (standalone or native); ``levels`` the
    attributes and expert levels of -c (-a N, -e N).
    """

    def __init__(self, params, experiments, reflections, show_config, show_help, diff):
        self.params = params
        self.experiments = experiments
        self.reflections = reflections
        self.show_config = show_config
        self.show_help = show_help
        self.diff = diff
        self.backend = "standalone"
        self.levels = {"attributes_level": 0, "expert_level": 0}
        self.verbosity = 0


#: DIALS' options whose value is the next word (a number, not a file or PHIL).
DIALS_OPTIONS_WITH_NUMBERS = {"-a": "attributes_level", "--attributes-level": "attributes_level",
                              "-e": "expert_level", "--expert-level": "expert_level"}


def _numbered_option(arg):
    """(option, value or None) for -a N, -a2, -a=2, --attributes-level=2 and
    the expert level alike, as argparse (DIALS' parser) takes them; None else."""
    if arg in DIALS_OPTIONS_WITH_NUMBERS:
        return arg, None
    if "=" in arg:
        option, value = arg.split("=", 1)
        return (option, value) if option in DIALS_OPTIONS_WITH_NUMBERS else None
    if arg[:2] in ("-a", "-e") and len(arg) > 2:
        return arg[:2], arg[2:]
    return None


#: Where an unknown parameter's error sends the user.
LISTED = "-c -e1 lists them all"


def _phil_file(path: str):
    """A PHIL file's parameters ('-': standard input, as DIALS' --phil -), or
    a one-line error naming it."""
    if not path:
        raise QConsistencyError("option --phil needs a file")
    try:
        if path == "-":
            return libtbx.phil.parse(backends.standard_input(), source_info="standard input")
        with open(path) as handle:
            return libtbx.phil.parse(handle.read(), source_info=path)
    except FileNotFoundError:
        raise QConsistencyError("file not found", path) from None
    except Exception as error:  # libtbx raises several kinds
        raise QConsistencyError(f"is not a valid PHIL file ({error})", path) from None


def parse_arguments(args, phil, accept_reflections=True):
    """Files by type, PHIL files and key=value words; the options DIALS
    programs take (-c, -h, -a N, -e N, -v)."""
    sources, experiments, reflections = [], [], []
    show_config, show_help = False, 0
    levels = {"attributes_level": 0, "expert_level": 0}
    verbosity = 0
    interpreter = phil.command_line_argument_interpreter(home_scope="")
    words = iter(args)
    for arg in words:
        if arg in ("-c", "--show-config"):
            show_config = True
        elif arg == "--help" or (arg.startswith("-h") and set(arg[1:]) == {"h"}):
            show_help += 1 if arg == "--help" else len(arg) - 1  # -hh: the help, then the configuration (as DIALS)
        elif arg == "--phil" or arg.startswith("--phil="):  # DIALS' --phil FILE
            sources.append(_phil_file(arg[len("--phil="):] if "=" in arg else next(words, "")))
        elif _numbered_option(arg):
            option, value = _numbered_option(arg)
            if value is None:
                value = next(words, "")
            if not value.lstrip("-").isdigit():
                raise QConsistencyError(f"option {option} needs a whole number")
            levels[DIALS_OPTIONS_WITH_NUMBERS[option]] = int(value)
        elif arg.startswith("-v") and set(arg[1:]) == {"v"}:
            verbosity += len(arg) - 1
        elif arg.startswith("-") and not os.path.exists(arg):
            raise QConsistencyError(f"unknown option {arg!r} (try -h)")
        elif os.path.isfile(arg) and arg.endswith((".phil", ".params", ".eff")):
            sources.append(_phil_file(arg))
        elif "=" in arg and not os.path.exists(arg):
            try:
                sources.append(interpreter.process(arg=arg))
            except Exception as error:
                name = re.match(r"\s*([\w.]+)\s*=", arg)
                if name and str(error).startswith("Unknown command line parameter definition"):
                    error = f"there is no parameter {name.group(1)!r} ({LISTED})"  # libtbx names its last part only
                raise QConsistencyError(f"bad parameter {arg!r}: {error}") from None
        elif arg.endswith(REFLECTION_EXTENSIONS) and accept_reflections:
            reflections.append(arg)
        elif arg.endswith(EXPERIMENT_EXTENSIONS):
            experiments.append(arg)
        elif not os.path.exists(arg):
            raise QConsistencyError("file not found", arg)
        elif accept_reflections:
            raise QConsistencyError("is neither an experiment list (.expt) nor a reflection table (.refl)", arg)
        else:
            raise QConsistencyError("is not an experiment list (.expt)", arg)
    try:
        working, unused = phil.fetch(sources=sources, track_unused_definitions=True)
        params = working.extract()
    except Exception as error:
        raise QConsistencyError(f"bad parameter: {error}") from None
    if unused:  # in a PHIL file (the command line's are refused above), as DIALS' parser refuses them
        word = unused[0].object.words[0] if unused[0].object.words else None
        where = f"line {word.line_number}: " if word is not None else ""
        raise QConsistencyError(f"{where}there is no parameter {unused[0].path!r} ({LISTED})",
                                word.source_info if word is not None else None)
    diff = phil.fetch_diff(source=working).as_str()
    arguments = Arguments(params, experiments, reflections, show_config, show_help, diff)
    arguments.levels, arguments.verbosity = levels, verbosity
    return arguments


def show_config(phil, attributes_level=0, expert_level=0):
    """The master scope as DIALS' ArgumentParser shows it for -c (-a, -e)."""
    print(
        "Showing configuration parameters with:\n"
        f"  attributes_level = {attributes_level}\n"
        f"  expert_level = {expert_level}\n"
    )
    print(phil.as_str(expert_level=expert_level, attributes_level=attributes_level))


def parse_or_show(args, phil, usage, help_message, accept_reflections=True):
    """The parsed command line, or None when it only asked for help (or was
    empty) or for the configuration (-c), which are then printed."""
    arguments = parse_arguments(args, phil, accept_reflections)
    if arguments.show_help or not args:
        print(f"Usage: {usage}\n{help_message}")
        if arguments.show_help > 1:  # as DIALS: -hh the configuration at expert level 1, -hhh at 2
            show_config(phil, attributes_level=arguments.verbosity, expert_level=arguments.show_help - 1)
        return None
    if arguments.show_config:
        show_config(phil, **arguments.levels)
        return None
    return arguments


def peek_backend(args, phil, accept_reflections=True):
    """(the ``backend=`` choice among the arguments, their standalone parse or
    None, the error they give), read before any file is: the choice is
    ``auto`` when the words do not parse, and "standalone" when the scope has
    no such parameter."""
    try:
        arguments = parse_arguments(args, phil, accept_reflections)
    except QConsistencyError as error:
        return "auto", None, error
    return getattr(arguments.params, "backend", "standalone"), arguments, None


def parse_command_line(args, phil, usage, help_message, accept_reflections=True):
    """The parsed command line with its backend resolved, or None when only
    help or the configuration was asked for (then printed).

    The standalone parser tells the input files apart for both backends; the
    native backend then parses the options and PHIL words with DIALS' own
    ArgumentParser (its -c, -h and logging), and reads the files later.
    """
    choice, arguments, error = peek_backend(args, phil, accept_reflections)
    backend = backends.resolve(choice)
    if error is not None:
        raise error
    if backend == "standalone":
        arguments = parse_or_show(args, phil, usage, help_message, accept_reflections)
    else:
        from dials_qconsistency.io import native

        files = arguments.experiments + arguments.reflections
        parsed = native.parse(args, files, phil, usage, help_message)
        if parsed is None:
            return None
        arguments.params, arguments.verbosity, arguments.diff = parsed
    if arguments is not None:
        arguments.backend = backend
    return arguments


class _LogFile(logging.FileHandler):
    """The log file; a write that fails (a full disk) must not print a traceback."""

    def handleError(self, record):
        pass


def stdout_to_devnull():
    """The reader of stdout has gone (``| head``): what is still to be printed
    goes to /dev/null, so that neither the log's console handler nor the
    interpreter's last flush prints a BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _quiet_when_stdout_closes(logger):
    """The console handlers of ``logger``'s run stop showing messages, without a
    traceback, once stdout is a closed pipe; the run goes on and its log file
    keeps every line. The native backend's (DIALS') handlers included."""
    for handler in _handlers(logger):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            _quiet_on_broken_pipe(handler)


def _quiet_on_broken_pipe(handler):
    report = handler.handleError

    def handle_error(record):
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            stdout_to_devnull()
        else:
            report(record)

    handler.handleError = handle_error


def setup_logging(logger, log_path, arguments=None):
    """Messages to stdout and, when a path is given, to the log file; with the
    native backend through DIALS' own logging configuration."""
    close_logging(logger)
    if arguments is not None and arguments.backend == "native":
        from dials_qconsistency.io import native

        native.setup_logging(logger, log_path, arguments.verbosity)
        _quiet_when_stdout_closes(logger)
        native.show_banner()
        return
    logger.setLevel(logging.INFO)
    logger.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    _quiet_when_stdout_closes(logger)
    if log_path:
        try:
            to_file = _LogFile(log_path, mode="w", encoding="utf-8")
        except OSError as error:
            raise QConsistencyError(f"cannot be written ({error.strerror})", log_path) from None
        to_file.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(to_file)


@contextlib.contextmanager
def logged_run(logger, log_path, arguments=None, outputs=None):
    """Log to stdout and the log file within the block; the error that ends it
    goes to the log file too (stderr shows it), as does an interruption (with
    whether ``outputs``, the run's ``StagedOutputs``, were written), and the
    log is closed."""
    setup_logging(logger, log_path, arguments)
    try:
        yield
    except QConsistencyError as error:
        log_to_file_only(logger, f"\nError: {error}")
        raise
    except (KeyboardInterrupt, Terminated) as interruption:
        log_to_file_only(logger, interruption_line(interruption, outputs))
        raise
    finally:
        close_logging(logger)


def interruption_line(interruption, outputs=None) -> str:
    """The log's last line when Ctrl-C or SIGTERM stops a run: were its outputs
    (``outputs``, a ``StagedOutputs``) written? A log that ends with a verdict
    must not be taken for the report of the files beside it."""
    what = "SIGTERM" if isinstance(interruption, Terminated) else "Ctrl-C (SIGINT)"
    if outputs is not None and outputs.committed:
        return f"\nInterrupted by {what} after the outputs were written"
    return (f"\nInterrupted by {what}: none of the outputs was written (files of their names are an earlier "
            "run's, not this log's)")


def log_header(logger, program, version, arguments):
    """The program and version, and the parameters changed from their defaults."""
    logger.info(f"{program} {version} ({arguments.backend} backend)")
    if arguments.backend == "native":
        from dials_qconsistency.io import native

        logger.info(native.version_line())
    if arguments.diff.strip():
        logger.info("The following parameters have been modified:\n%s", arguments.diff)


def log_to_file_only(logger, message):
    """Write ``message`` to the log file alone (not the console), e.g. the error
    that ends a run, which stderr shows; DIALS' log file handler included. It is
    a plain line (INFO) in both backends' logs: DIALS' formatter would put a
    line of its own, "WARN: ", before a message at a higher level that starts
    with a new line."""
    record = logging.makeLogRecord({"msg": message, "levelno": logging.INFO, "levelname": "INFO"})
    for handler in _handlers(logger):
        if isinstance(handler, logging.FileHandler):
            handler.emit(record)


def _handlers(logger):
    """The handlers a record of ``logger`` reaches (its own and its parents')."""
    while logger is not None:
        yield from logger.handlers
        logger = logger.parent if logger.propagate else None


def close_logging(logger):
    """Remove and close the handlers of this run (with the native backend, the
    ones dials.util.log.config added)."""
    added = [(logger, handler) for handler in logger.handlers] + getattr(logger, "native_handlers", [])
    logger.native_handlers = []
    for owner, handler in added:
        owner.removeHandler(handler)
        try:
            handler.close()
        except OSError:  # flushing the log onto a full disk
            pass


def _identity(path):
    """(device, inode) of an existing file, else None."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_dev, status.st_ino)


def check_output_paths(outputs: dict[str, str], inputs: list[str]) -> None:
    """Before anything is read or written: no output may replace an input or
    another output, and each must be writable where it is to go.

    ``outputs`` maps the parameter naming a file to the path; parameters that
    start with ``output.plots`` may name a folder that does not exist yet.
    Paths are compared after links (real paths and inodes), in time linear in
    the number of files, so runs over thousands of pairs check quickly.
    """
    input_names = {os.path.realpath(p) for p in inputs}
    input_ids = {_identity(p) for p in inputs} - {None}
    seen_names, seen_ids = {}, {}
    folders = {}
    for parameter, path in outputs.items():
        real, identity = os.path.realpath(path), _identity(path)
        if real in input_names or identity in input_ids:
            raise QConsistencyError(f"{parameter} would overwrite the input file", path)
        other = seen_names.get(real) or (seen_ids.get(identity) if identity else None)
        if other:
            raise QConsistencyError(f"{parameter} and {other} name the same file", path)
        seen_names[real] = parameter
        if identity:
            seen_ids[identity] = parameter
        if os.path.isdir(path):
            raise QConsistencyError(f"{parameter} cannot be written (it is a directory)", path)
        folder = os.path.dirname(os.path.abspath(path))
        creatable = parameter.startswith("output.plots")  # a plots folder is created
        if (folder, creatable) not in folders:
            folders[(folder, creatable)] = _folder_problem(folder, creatable)
        problem = folders[(folder, creatable)]
        if problem:
            raise QConsistencyError(f"{parameter} cannot be written ({problem})", path)


def _folder_problem(folder, creatable):
    """Why files cannot be written in ``folder`` (None if they can)."""
    if creatable:  # its nearest existing parent must be writable
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
    elif not os.path.exists(folder):
        return f"no folder {folder}"
    if not os.path.isdir(folder):
        return f"{folder} is not a directory"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"no permission to write in {folder}"
    return None


class Terminated(BaseException):
    """SIGTERM (a batch system's time limit): unwind so that no partial output stays."""


def _terminate(signum, frame):
    raise Terminated(signum)


def blas_on_one_thread(run):
    """``run`` with BLAS (numpy's matrix products, least squares) on the
    calling thread, restored after. The program's own threads are its
    parallelism (blocks of rows, the table's writer); BLAS's would compete
    with them for the cores and spin while they wait (at 1M rows 0.2 s of
    1.9 s CPU, and half a diagnosis's CPU). The results are the same bits."""

    @functools.wraps(run)
    def limited(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return run(*args, **kwargs)

    return limited


def run_program(name, run, argv):
    """Run ``run(argv)`` as a console command; returns its exit status.

    0 success; 1 bad input (one line on stderr naming the file) or an internal
    error; 2 a fail_if gate; 130 interrupted; 143 SIGTERM. ``debug=True`` on
    the command line shows tracebacks.
    """
    debug = any(a.replace(" ", "") in ("debug=True", "debug=true") for a in argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(argv)
    except QConsistencyError as error:
        if debug:
            traceback.print_exc()
        print(f"{name}: error: {error}", file=sys.stderr)
        return 1
    except GateFailed as failure:
        print(f"{name}: fail_if: {failure}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # printing -c or -h into a pipe that closed
        stdout_to_devnull()
        return 0
    except KeyboardInterrupt:
        print(f"{name}: interrupted (outputs are all written or none)", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{name}: terminated by SIGTERM (outputs are all written or none)", file=sys.stderr)
        return 143
    except Exception as error:  # a bug: say so in one line unless asked for more
        if debug:
            raise
        print(
            f"{name}: internal error: {type(error).__name__}: {error} (run again with debug=True for a traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_console(main):
    """The installed command: ``main()``, then the process ends with its
    status (:func:`end_process`), also when DIALS' option parser has exited by
    itself (``-c``, ``-h`` inside DIALS)."""
    try:
        status = main()
    except SystemExit as exit:
        status = exit.code
    end_process(status)


def end_process(status: int):
    """End the installed command with ``status``. Every output is written,
    synced and closed by then, and the operating system frees the process's
    memory: the objects are frozen (``gc.freeze``) so that the interpreter's
    last garbage collection does not visit them all (0.3 s once DIALS'
    modules are imported). ``atexit`` handlers (logging's flush) still run,
    except after dials.q_map abandoned an HDF5 file (``map_files.libhdf5_unclean``):
    the process then ends at once, its logs flushed."""
    gc.freeze()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_to_devnull()
    map_files = sys.modules.get("dials_qconsistency.io.map_files")
    if map_files is not None and map_files.libhdf5_unclean:  # its clean-up at exit could crash
        logging.shutdown()
        sys.stderr.flush()
        os._exit(status if isinstance(status, int) else 1)
    sys.exit(status)
