import sys

from prefixtune.train.loop import main

sys.exit(main())
