"""`python -m jobs.teacher_cache --config jobs/configs/teacher-cache-pairs.yaml key=value ...`: the teacher's top-k cache (Ray Data, GPU actors)."""
from jobs import run

if __name__ == "__main__":
    run("teacher-cache")
