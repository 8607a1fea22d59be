#!/usr/bin/env bash
# Refresh the pinned copies of the consumers' config definitions that the export tests check against.
#   tests/consumers/refresh.sh megatron  <git-ref>  [clone-dir]   (default ref: core_v0.16.1, matching megatron-core in the venv)
#   tests/consumers/refresh.sh torchtitan <git-ref> [clone-dir]   (default ref: the commit in torchtitan/PIN)
# With a clone-dir the files come from `git show REF:path` there; without one they are downloaded from
# raw.githubusercontent.com, saved as FILE.py.pinned (upstream code, kept out of pyflakes and pytest). The PIN file records repository, ref and commit; update the export's
# TARGET string (meshwright/launcher/planner/export/stacks.py) when you move a pin.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
which="${1:?megatron or torchtitan}"
case "$which" in
  megatron) repo=NVIDIA/Megatron-LM; ref="${2:-core_v0.16.1}"; dest="$here/megatron_lm"
            files="megatron/training/arguments.py megatron/training/argument_utils.py megatron/training/training_config.py
                   megatron/training/common_config.py megatron/training/resilience_config.py" ;;
  torchtitan) repo=pytorch/torchtitan; ref="${2:-$(sed -n 's/^commit: //p' "$here/torchtitan/PIN")}"; dest="$here/torchtitan"
              files="torchtitan/config/configs.py torchtitan/models/common/rope.py" ;;
  *) echo "usage: $0 megatron|torchtitan [ref] [clone-dir]" >&2; exit 2 ;;
esac
clone="${3:-}"
for f in $files; do
  mkdir -p "$dest/$(dirname "$f")"
  if [ -n "$clone" ]; then
    git -C "$clone" show "$ref:$f" > "$dest/$f.pinned"
  else
    curl -fsSL "https://raw.githubusercontent.com/$repo/$ref/$f" -o "$dest/$f.pinned"
  fi
done
commit="$ref"
if [ -n "$clone" ]; then commit="$(git -C "$clone" rev-parse "$ref^{commit}")"; fi
printf 'repository: %s\nref: %s\ncommit: %s\nfiles: %s\n' "$repo" "$ref" "$commit" "$(echo $files)" > "$dest/PIN"
echo "pinned $repo@$commit into $dest"
