#!/usr/bin/env bash
# The README's test command: installs the system packages the build needs if
# they are missing (scripts/install-deps.sh), then runs the workspace's tests.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# checks that cannot run here record why (moe_types::testing::skip): listed after the run
export MOE_SKIPPED_TESTS="$PWD/target/skipped-tests.txt"
mkdir -p target
: >"$MOE_SKIPPED_TESTS"
cargo test --workspace "$@"
skipped=$(wc -l <"$MOE_SKIPPED_TESTS")
echo "checks skipped at run time: $skipped"
sed 's/^/  skipped: /' "$MOE_SKIPPED_TESTS"
