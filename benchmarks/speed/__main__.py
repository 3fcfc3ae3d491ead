"""`python -m benchmarks.speed`: see `benchmarks.speed` or `--help`."""

from benchmarks.speed.main import main

if __name__ == "__main__":
    main()
