"""What crosses the process boundary, torch-free (the launcher imports these; the engine CLI and server too):

request.py   GenerateRequest: its fields, defaults, limits and validation, and each field's command-line flag
events.py    what the engine reports (the generation's events and the server's), to_dict and one decoder
protocol.py  the commands the launcher sends the engine server, and the JSON-lines codec
layout.py    the models folder: folder names, tokenizer folders, weight and LoRA file suffixes
errors.py    UserError (bad input: one sentence, exit code 2) and Cancelled
"""
