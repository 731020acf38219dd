# Shell helpers shared by scripts/install-deps and scripts/check-fresh-machine (sourced).
# Callers set `prog` (the name shown in messages) first.

say() { printf '%s: %s\n' "$prog" "$*"; }
die() {
    printf '%s: ERROR: %s\n' "$prog" "$*" >&2
    exit 1
}

# Keep the output short, but show everything when a step fails.
quietly() {
    local log
    log="$(mktemp)"
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "failed: $*"
    fi
    rm -f "$log"
}

installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 ||
    die "this needs Debian 12 or Ubuntu (apt-get, dpkg)"

sudo=()
if ((EUID != 0)); then
    command -v sudo >/dev/null 2>&1 || die "not root and no sudo: run as root, or install sudo"
    sudo=(sudo)
fi

# apt-get install waits for the dpkg lock itself (DPkg::Lock::Timeout); apt-get update does
# not wait for the lists lock, so it is retried while another apt run holds it.
apt_options=(-q -o DPkg::Lock::Timeout=1800)
apt_updated=no
apt_update_once() {
    [[ $apt_updated == yes ]] && return
    local log waited=0
    log="$(mktemp)"
    until "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_options[@]}" update >"$log" 2>&1; do
        if ! grep -q 'Could not get lock' "$log" || ((waited >= 1800)); then
            cat "$log" >&2
            rm -f "$log"
            die "apt-get update failed"
        fi
        ((waited == 0)) && say "waiting for another apt run to finish ($(grep -m1 -o 'held by process [0-9]*.*' "$log" || true))"
        sleep 5
        waited=$((waited + 5))
    done
    rm -f "$log"
    apt_updated=yes
}

# apt_install PACKAGE...: installs them (callers pass only missing ones); never removes a
# package, never starts a daemon (policy-rc.d, honoured by invoke-rc.d and deb-systemd-invoke).
apt_install() {
    local policy=/usr/sbin/policy-rc.d own_policy=no
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# temporary, from pop3-imap-bridge scripts\nexit 101\n' |
            "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 755 "$policy"
        own_policy=yes
    fi
    say "installing $* (apt-get; waits for other apt runs)"
    apt_update_once
    local status=0 log
    log="$(mktemp)"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get "${apt_options[@]}" install -y --no-install-recommends --no-remove "$@" >"$log" 2>&1 || status=$?
    if [[ $own_policy == yes ]]; then
        "${sudo[@]}" rm -f "$policy"
    fi
    if ((status)); then
        cat "$log" >&2
        rm -f "$log"
        die "apt-get install failed (it never removes a package: a conflict stops it instead)"
    fi
    rm -f "$log"
}
