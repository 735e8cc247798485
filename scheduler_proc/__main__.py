from engine.child_process import child_main
from scheduler_proc.scheduler import run_scheduler

child_main("scheduler", run_scheduler)
