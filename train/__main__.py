import sys

from prefixtune.train.args import parse_args

# The arguments first, with the standard library alone: --help and a bad flag answer at once, before torch and
# DeepSpeed load (seconds, and DeepSpeed's import prints an accelerator line). main() parses them again.
parse_args(sys.argv[1:])

from prefixtune.train.loop import main  # noqa: E402

sys.exit(main())
