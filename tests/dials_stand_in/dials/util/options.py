"""dials.util.options.ArgumentParser: -c, -h, -v, PHIL words and files, and
input files read into params.input.experiments / .reflections (objects with
``filename`` and ``data``); what it cannot use is returned as unhandled."""

import argparse
import os
import sys

import libtbx.phil


class FilenameDataWrapper:
    def __init__(self, filename, data):
        self.filename = filename
        self.data = data


class _PhilParser:
    def __init__(self):
        self.handling_errors = {}


class ArgumentParser:
    def __init__(self, usage=None, phil=None, read_experiments=False, read_reflections=False,
                 check_format=True, epilog=None, **kwargs):
        self.usage, self.phil, self.epilog = usage, phil, epilog
        self.read_experiments, self.read_reflections = read_experiments, read_reflections
        self._phil_parser = _PhilParser()
        self.diff_phil = None

    def print_help(self):
        print(f"usage: {self.usage}\n{self.epilog}")

    def parse_args(self, args=None, show_diff_phil=False, return_unhandled=False):
        from dxtbx.model.experiment_list import ExperimentListFactory

        from dials.array_family import flex

        args = sys.argv[1:] if args is None else list(args)
        options = argparse.Namespace(verbose=args.count("-v"), help=args.count("-h"))
        if "-c" in args or options.help:
            if options.help:
                self.print_help()
            print(self.phil.as_str())
            sys.exit(0)
        sources, experiments, reflections, unhandled = [], [], [], []
        interpreter = self.phil.command_line_argument_interpreter(home_scope="")
        for arg in args:
            if arg == "-v":
                continue
            if "=" in arg and not os.path.exists(arg):
                sources.append(interpreter.process(arg=arg))
            elif arg.endswith(".phil") and os.path.isfile(arg):
                sources.append(libtbx.phil.parse(open(arg).read()))
            elif self.read_experiments and arg.endswith((".expt", ".json")) and os.path.isfile(arg):
                try:
                    experiments.append(FilenameDataWrapper(arg, ExperimentListFactory.from_json_file(arg)))
                except Exception:
                    unhandled.append(arg)
            elif self.read_reflections and arg.endswith(".refl") and os.path.isfile(arg):
                try:
                    reflections.append(FilenameDataWrapper(arg, flex.reflection_table.from_file(arg)))
                except Exception:
                    unhandled.append(arg)
            else:
                unhandled.append(arg)
        working = self.phil.fetch(sources=sources)
        params = working.extract()
        self.diff_phil = self.phil.fetch_diff(source=working)
        params.input.__inject__("experiments", experiments)  # DIALS adopts an input scope with these
        params.input.__inject__("reflections", reflections)
        if return_unhandled:
            return params, options, unhandled
        return params, options
