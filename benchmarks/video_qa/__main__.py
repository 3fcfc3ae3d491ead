"""`python -m benchmarks.video_qa`: see `benchmarks.video_qa` or `--help`."""

from benchmarks.video_qa.main import main

if __name__ == "__main__":
    main()
