"""`python -m jobs.prompt_distill --config jobs/configs/<prompt-distill>.yaml key=value ...`: the Prompt-Distiller recipe (Ray Train)."""
from jobs import run

if __name__ == "__main__":
    run("prompt-distill")
