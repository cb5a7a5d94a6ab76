"""`python -m jobs.lmbff_search --config jobs/configs/lmbff-search.yaml key=value ...`: LM-BFF's automatic label words and templates (Ray Data, GPU actors)."""
from jobs import run

if __name__ == "__main__":
    run("lmbff-search")
