"""Definitions every process may import: settings, wire messages, IPC addresses, child-process plumbing,
the model folder, sampling parameters, the engine's error type and the text decoding the detokenizer and
the finish check share. Nothing here imports the frontend (engine.engine, tokenizer_proc) or a process
package (scheduler_proc, detokenizer_proc)."""
