"""`python -m jobs.report --config jobs/configs/<report>.yaml key=value ...`: result tables and plots from run records."""
from jobs import run

if __name__ == "__main__":
    run("report")
