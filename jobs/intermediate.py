"""`python -m jobs.intermediate pairs|sentiment --config jobs/configs/intermediate-<kind>.yaml key=value ...`: SMASH intermediate examples (Ray Data)."""
from jobs import run

if __name__ == "__main__":
    run("intermediate")
