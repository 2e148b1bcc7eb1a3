#!/usr/bin/env bash
# One command from nothing to a pushed branch: builds kennel, starts `kennel up` (coordinator +
# local daemon on embedded SQLite) in a scratch directory, makes a small git repository with a
# bare remote, runs a task through it and shows the branch the task pushed.
#
# The task uses a `command` agent profile (a shell script) so this runs anywhere; point
# `--agent claude` at a real repository once Claude Code is installed to do real work.
#
# It builds the development profile: a first run in about a quarter of the time of an
# optimized build (docs/benchmarks.md), and the dependencies it compiles are the ones
# `scripts/test` needs next. For real work install the optimized binary:
# `cargo install --path crates/kennel` (or `cargo build --release -p kennel`).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -p kennel
KENNEL="$PWD/target/debug/kennel"
WORK="$(mktemp -d -t kennel-quickstart-XXXXXX)"
trap 'kill "$UP_PID" 2>/dev/null || true; wait "$UP_PID" 2>/dev/null || true' EXIT

# A repository with a bare "remote" the task will push to.
git init -q -b main "$WORK/seed"
echo "# demo" > "$WORK/seed/README.md"
git -C "$WORK/seed" -c user.name=demo -c user.email=demo@example.invalid add README.md
git -C "$WORK/seed" -c user.name=demo -c user.email=demo@example.invalid commit -q -m initial
git clone -q --bare "$WORK/seed" "$WORK/remote.git"

cat > "$WORK/kennel.toml" <<TOML
[daemon.agents.shell]
kind = "command"
command = ["sh", "-c", "{prompt}"]
TOML

"$KENNEL" --config "$WORK/kennel.toml" up --listen 127.0.0.1:0 --data-dir "$WORK/data" > "$WORK/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq 1 100); do
  URL=$(sed -n 's/^kennel: up at //p' "$WORK/up.log")
  [ -n "$URL" ] && break
  kill -0 "$UP_PID" 2>/dev/null || { cat "$WORK/up.log"; exit 1; }
  sleep 0.1
done
[ -n "$URL" ] || { echo "kennel up did not start; its log:"; cat "$WORK/up.log"; exit 1; }
echo "kennel is up at $URL (data in $WORK/data)"

# Client commands find it through its data directory: where it listens and its admin key.
"$KENNEL" task submit --data-dir "$WORK/data" --agent shell --repo "$WORK/remote.git" --name "add a greeting" -f \
  'echo "hello from kennel" > GREETING.md && echo "wrote GREETING.md"'

BRANCH=$(git --git-dir "$WORK/remote.git" for-each-ref --format='%(refname:short)' refs/heads/kennel/)
echo "the remote now has branch $BRANCH:"
git --git-dir "$WORK/remote.git" log --oneline -1 "$BRANCH"
git --git-dir "$WORK/remote.git" show "$BRANCH:GREETING.md"
echo
echo "That was a development build, for a quick first run. For real work, install the optimized"
echo "binary (smaller and faster): cargo install --path crates/kennel"
