from detokenizer_proc.detokenizer import run_detokenizer
from engine.shared.child_process import child_main

child_main("detokenizer", run_detokenizer)
