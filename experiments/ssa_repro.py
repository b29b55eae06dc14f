"""Reproduce SSA's claims at small scale (same as `sparsa experiment ssa`). See sparsa/experiments/ssa_repro.py."""
import sys

from sparsa.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "ssa", *sys.argv[1:]]))
