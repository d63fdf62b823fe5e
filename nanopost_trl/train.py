"""`python -m nanopost_trl.train` and `accelerate launch ... -m nanopost_trl.train`: the command line
(`nanopost_trl.cli`), under the module name a launcher runs."""

from nanopost_trl.cli import main

if __name__ == "__main__":
    main()
