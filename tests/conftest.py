import sys
from pathlib import Path

# The references and the tolerance table are imported as plain modules by every test file.
sys.path.insert(0, str(Path(__file__).parent))
