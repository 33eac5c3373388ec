#!/usr/bin/env bash
# The README's test command: installs the system packages the build needs if
# they are missing (scripts/install-deps.sh), then runs the workspace's tests.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec cargo test --workspace "$@"
