"""Runs a script with boolean module flags set first (A/B checks of kernel variants that are module constants).

    PYTHONPATH=. python3 scripts/with_flags.py sparsa.ops.sparse_attn.kv_gluon CONTIG+KV_REUSE \
        scripts/gpu_sparse_attention.py --quick

Each name must be an existing bool attribute of the module ('+'-joined; 'name=0' turns one off).
"""
import importlib
import runpy
import sys


def main():
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    module = importlib.import_module(sys.argv[1])
    for item in filter(None, sys.argv[2].split("+")):
        name, _, value = item.partition("=")
        if not isinstance(getattr(module, name, None), bool):
            raise SystemExit(f"{sys.argv[1]}.{name} is not a bool flag")
        setattr(module, name, value != "0")
        print(f"{sys.argv[1]}.{name} = {getattr(module, name)}", flush=True)
    script = sys.argv[3]
    sys.argv = sys.argv[3:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
