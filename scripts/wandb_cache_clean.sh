#!/usr/bin/env bash
# Prune the local W&B artifact cache: files older than --max_age_days, then the oldest files until the cache is
# under --max_size_gb. Runs once, or every --interval seconds. Only ever deletes regular files inside the cache
# directory (symlinks are not followed, other filesystems are not entered). See docs/operations.md.
set -euo pipefail
# A script's background job (`nohup ... &` in a script, cron) starts with SIGINT ignored, which bash cannot trap:
# start again with SIGINT restored, so that `kill -2` stops the loop there too.
# (once: MATECONV_SIGINT_RESTORED; and only where env can, GNU coreutils 8.31+)
if [[ -z ${MATECONV_SIGINT_RESTORED:-} ]] && (((0x$(awk '/^SigIgn/ {print $2}' /proc/$$/status 2>/dev/null ||
        echo 0)) & 2)) && env --default-signal=INT true 2>/dev/null; then
    MATECONV_SIGINT_RESTORED=1 exec env --default-signal=INT bash "$0" "$@"
fi

usage() {
    cat <<'EOF'
usage: scripts/wandb_cache_clean.sh [--dir DIR] [--max_age_days DAYS] [--max_size_gb GB] [--interval SECONDS] [--dry_run]

  --dir DIR            cache to prune (default: $WANDB_CACHE_DIR/artifacts, else ~/.cache/wandb/artifacts)
  --max_age_days DAYS  delete files last modified more than DAYS ago (decimals allowed: 0.5 = 12 hours)
  --max_size_gb GB     then delete the oldest files until the cache holds at most GB (decimals allowed);
                       also runs `wandb artifact cache cleanup` when the wandb CLI is installed
  --interval SECONDS   repeat every SECONDS (0 = run once, the default); stop with Ctrl-C or kill -2
  --dry_run            print what would be deleted, delete nothing

example (hourly, in the background):
  nohup scripts/wandb_cache_clean.sh --max_age_days 1 --max_size_gb 20 --interval 3600 >> logs/wandb_clean.log 2>&1 &
EOF
}

die() { echo "wandb_cache_clean: $*" >&2; exit 2; }
is_number() { [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]; }

dir="" dir_given=0 max_age_days="" max_size_gb="" interval=0 dry_run=0
while (($#)); do
    case $1 in
        --dir|--max_age_days|--max_size_gb|--interval)
            (($# >= 2)) || die "$1 needs a value"
            case $1 in
                --dir) dir=$2 dir_given=1 ;;
                --max_age_days) max_age_days=$2 ;;
                --max_size_gb) max_size_gb=$2 ;;
                --interval) interval=$2 ;;
            esac
            shift 2 ;;
        --dry_run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ -z $max_age_days ]] || is_number "$max_age_days" || die "--max_age_days must be a non-negative number, got '$max_age_days'"
[[ -z $max_size_gb ]] || is_number "$max_size_gb" || die "--max_size_gb must be a non-negative number, got '$max_size_gb'"
[[ $interval =~ ^[0-9]+$ ]] || die "--interval must be a whole number of seconds, got '$interval'"
[[ -n $max_age_days || -n $max_size_gb ]] || die "give --max_age_days and/or --max_size_gb (see --help)"

if ((!dir_given)); then
    if [[ -n ${WANDB_CACHE_DIR:-} ]]; then
        dir=$WANDB_CACHE_DIR/artifacts
    else
        dir=${XDG_CACHE_HOME:-${HOME:?HOME is not set}/.cache}/wandb/artifacts
    fi
fi
[[ -n $dir ]] || die "empty cache directory"
[[ -d $dir ]] || die "cache directory does not exist: $dir"
cache=$(realpath -e -- "$dir") || die "cannot resolve $dir"
home=$(realpath -m -- "${HOME:-/}")
# Refuse /, top-level directories (/tmp, /usr, ...), $HOME and anything that contains $HOME.
[[ $cache == /*/* ]] || die "refusing to prune '$cache': too close to /"
[[ $home/ != "$cache"/* ]] || die "refusing to prune '$cache': it is \$HOME or contains it"

log() { echo "[$(date '+%F %T')] $*"; }

# Deletes (or, in a dry run, lists) the NUL-separated "mtime size path" records on stdin; prints "count bytes".
remove_records() {
    local count=0 bytes=0 mtime size path
    while IFS=' ' read -r -d '' mtime size path; do
        if ((dry_run)); then
            echo "would delete $path ($size bytes, modified $(date -d "@${mtime%.*}" '+%F %T'))" >&2
        else
            rm -f -- "$path"
        fi
        count=$((count + 1)) bytes=$((bytes + size))
    done
    echo "$count $bytes"
}

list_files() {  # all regular files in the cache as NUL-separated "mtime size path", oldest first
    find -P "$cache" -xdev -type f "$@" -printf '%T@ %s %p\0' | sort -z -n
}

cache_bytes() { find -P "$cache" -xdev -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%d", s }'; }

clean_once() {
    local result count bytes verb
    verb=$( ((dry_run)) && echo "would delete" || echo "deleted")
    if [[ -n $max_age_days ]]; then
        local minutes
        minutes=$(awk -v d="$max_age_days" 'BEGIN { printf "%d", d * 1440 }')
        result=$(list_files -mmin "+$minutes" | remove_records)
        read -r count bytes <<<"$result"
        log "$cache: $verb $count files ($((bytes / 1048576)) MiB) older than $max_age_days days"
    fi
    if [[ -n $max_size_gb ]]; then
        local limit total
        limit=$(awk -v g="$max_size_gb" 'BEGIN { printf "%d", g * 1073741824 }')
        if ((!dry_run)) && command -v wandb >/dev/null && [[ $(basename "$cache") == artifacts ]]; then
            WANDB_CACHE_DIR=$(dirname "$cache") wandb artifact cache cleanup "$limit" \
                || log "wandb artifact cache cleanup failed; pruning oldest first"
        fi
        total=$(cache_bytes)
        # Oldest first: keep taking records until what is left fits under the limit.
        result=$(list_files | awk -v RS='\0' -v ORS='\0' -v excess=$((total - limit)) \
            'excess > 0 { split($0, f, " "); print; excess -= f[2] }' | remove_records)
        read -r count bytes <<<"$result"
        log "$cache: $verb $count files ($((bytes / 1048576)) MiB) to get under $max_size_gb GB;" \
            "$(((total - bytes) / 1048576)) MiB left"
    fi
    # Empty directories left behind (never the cache directory itself).
    ((dry_run)) || find -P "$cache" -xdev -mindepth 1 -type d -empty -delete
}

trap 'log "stopped"; kill ${!:-} 2>/dev/null || true; exit 0' INT TERM  # ${!}: the sleep between passes
while true; do
    clean_once
    ((interval > 0)) || break
    sleep "$interval" &
    wait $!
done
