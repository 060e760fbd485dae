"""``python -m lora_cli train|merge|eval ...``"""

from .cli import main

main()
