"""Talk to a trained model: one answer to --prompt, or an interactive chat; a thin front end over minillm.cli.generate.

    python generate.py --model out/sft --prompt "请以《浣溪沙》为词牌写一首词"
    python generate.py --model out/pretrain --raw --prompt "床前明月光，"
    python generate.py --model out/sft                 # interactive chat; /reset, /exit, Ctrl-D
"""

import sys

from minillm.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
