#!/usr/bin/env bash
# A one-node Slurm cluster on localhost for development and tests, with real accounting (slurmdbd + MariaDB),
# so sbatch, squeue, scancel, scontrol requeue and sacct are the real ones.
#
#   bash slurm/local_cluster.sh up       # start munged, mariadbd, slurmdbd, slurmctld, slurmd (idempotent)
#   bash slurm/local_cluster.sh status   # which daemons run (exit 0 only when all five do), and sinfo
#   bash slurm/local_cluster.sh down     # stop the daemons this script started, by their recorded PIDs
#   eval "$(bash slurm/local_cluster.sh env)"   # export SLURM_CONF for sbatch/sinfo/sacct in this shell
#
# Everything lives in one state folder (DPO_SLURM_DIR, default .slurm/ in the repo): configs, munge key and socket,
# the MariaDB data, spool, logs and pids/, the PIDs recorded at start. Nothing in /etc is changed except, when
# /etc/slurm/slurm.conf does not exist, a symlink to ours so plain `sinfo` works (removed again by `down`).
# Ports: DPO_SLURM_PORT (default 6817) for slurmctld, +1 slurmd, +2 slurmdbd, +3 MariaDB, all on 127.0.0.1.
# Needs root (slurmd starts jobs as their user) and Debian's slurmctld slurmd slurm-client munge slurmdbd
# mariadb-server: `bash scripts/setup.sh --slurm` installs them.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
state=${DPO_SLURM_DIR:-$repo/.slurm}
port=${DPO_SLURM_PORT:-6817}
etc=$state/etc run=$state/run logs=$state/log pids=$state/pids
conf=$etc/slurm.conf
daemons=(munged mariadbd slurmdbd slurmctld slurmd)

say() { printf '[local_cluster %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'local_cluster.sh: %s\n' "$*" >&2; exit 1; }

# A recorded PID counts as ours only while /proc says it is still that daemon (PIDs are reused); zombies are stopped.
alive() {
  local name=$1 pid
  [ -f "$pids/$name" ] || return 1
  pid=$(cat "$pids/$name")
  [ -d "/proc/$pid" ] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

# Daemons delete their pid file early in shutdown, so the PID is copied to pids/ as soon as the file appears.
record_pid() {
  local name=$1 file=$2 i
  for i in $(seq 1 100); do
    if [ -s "$file" ] && [ "$(cat "/proc/$(cat "$file")/comm" 2>/dev/null)" = "$name" ]; then
      cp "$file" "$pids/$name"; return 0
    fi
    sleep 0.1
  done
  die "$name did not start; its log: $logs/$name.log"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2 deadline=$((SECONDS + $1))
  shift 2
  while [ $SECONDS -lt $deadline ]; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$what not ready after ${seconds} s; logs in $logs/"
}

check_requirements() {
  [ "$(id -u)" = 0 ] || die "needs root: slurmd starts each job as the submitting user (run with sudo)"
  local missing=() cmd
  for cmd in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch sacct; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  [ ${#missing[@]} = 0 ] || die "missing ${missing[*]}: run \`bash scripts/setup.sh --slurm\` (apt-get install slurmctld slurmd slurm-client munge slurmdbd mariadb-server)"
  [ ${#run} -lt 90 ] || die "state folder path too long for unix sockets ($run); set DPO_SLURM_DIR to a shorter path"
}

write_configs() {
  mkdir -p "$etc" "$run" "$logs" "$pids" "$state/spool/ctld" "$state/spool/d"
  chmod 700 "$etc" "$run"
  if [ ! -s "$etc/munge.key" ]; then
    dd if=/dev/urandom of="$etc/munge.key" bs=1024 count=1 status=none
    chmod 400 "$etc/munge.key"
  fi
  if [ ! -s "$etc/db_password" ]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$etc/db_password")
  fi
  # The node line comes from `slurmd -C`; RealMemory a little below what it measures, or the node is drained.
  local node_line host cpus memory
  node_line=$(slurmd -C | head -1)
  host=$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' <<<"$node_line")
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")
  memory=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
  memory=$((memory * 9 / 10))
  local topology=${node_line#NodeName=$host }
  topology=$(sed 's/ RealMemory=[0-9]*//' <<<"$topology")
  cat > "$conf" <<EOF
# Written by slurm/local_cluster.sh; regenerated at every 'up'.
ClusterName=dpolocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job restarts after ~15 s instead of the default two minutes
AuthInfo=socket=$run/munge.socket,cred_expire=10
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d
SlurmctldPidFile=$run/slurmctld.pid
SlurmdPidFile=$run/slurmd.pid
SlurmctldLogFile=$logs/slurmctld.log
SlurmdLogFile=$logs/slurmd.log
# No systemd and no cgroups here: track job processes through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
JobRequeue=1
MpiDefault=none
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((port + 2))
# the munge socket for talking to slurmdbd (AuthInfo covers only slurmctld/slurmd)
AccountingStoragePass=$run/munge.socket
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 $topology RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  (umask 077; cat > "$etc/slurmdbd.conf" <<EOF
# Written by slurm/local_cluster.sh; regenerated at every 'up'.
AuthType=auth/munge
AuthInfo=socket=$run/munge.socket
DbdHost=localhost
DbdPort=$((port + 2))
SlurmUser=root
PidFile=$run/slurmdbd.pid
LogFile=$logs/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((port + 3))
StorageUser=slurm
StoragePass=$(cat "$etc/db_password")
StorageLoc=slurm_acct_db
EOF
  )
}

mysql_root() { mariadb --no-defaults --socket="$run/mysqld.sock" -u root "$@"; }

start_munged() {
  alive munged && return 0
  rm -f "$run/munged.pid"
  munged --force --key-file="$etc/munge.key" --socket="$run/munge.socket" --pid-file="$run/munged.pid" \
    --log-file="$logs/munged.log" --seed-file="$state/munged.seed"
  record_pid munged "$run/munged.pid"
}

start_mariadbd() {
  alive mariadbd && return 0
  if [ ! -d "$state/mysql/mysql" ]; then
    say "initialising the accounting database in $state/mysql"
    mariadb-install-db --no-defaults --user=root --datadir="$state/mysql" --auth-root-authentication-method=socket \
      --skip-test-db > "$logs/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $logs/mariadb-install.log"
  fi
  # mariadbd stays in the foreground, so it is detached here; --no-defaults keeps /etc/mysql out of it.
  rm -f "$run/mariadbd.pid"
  setsid mariadbd --no-defaults --user=root --datadir="$state/mysql" --socket="$run/mysqld.sock" \
    --pid-file="$run/mariadbd.pid" --port=$((port + 3)) --bind-address=127.0.0.1 \
    --log-error="$logs/mariadbd.log" < /dev/null > /dev/null 2>&1 &
  record_pid mariadbd "$run/mariadbd.pid"
  wait_for 30 "MariaDB" mysql_root -e "select 1"
  local password
  password=$(cat "$etc/db_password")
  mysql_root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$password';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$password';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_slurm_daemon() {  # slurmdbd, slurmctld, slurmd: each forks into the background and writes its pid file
  local name=$1
  alive "$name" && return 0
  rm -f "$run/$name.pid"
  SLURM_CONF=$conf "$name" || die "$name failed to start; see $logs/$name.log"
  record_pid "$name" "$run/$name.pid"
}

node_idle() { [ -n "$(SLURM_CONF=$conf timeout 10 sinfo -h -o %T 2>/dev/null | grep -E '^(idle|mixed|allocated)')" ]; }

cmd_up() {
  check_requirements
  local all=1 name
  for name in "${daemons[@]}"; do alive "$name" || all=0; done
  if [ $all = 1 ]; then say "already up (state in $state)"; return 0; fi
  local start=$SECONDS
  write_configs
  start_munged
  start_mariadbd
  start_slurm_daemon slurmdbd
  wait_for 30 "slurmdbd" env SLURM_CONF="$conf" timeout 10 sacctmgr -n -i show cluster
  start_slurm_daemon slurmctld
  wait_for 30 "slurmctld" env SLURM_CONF="$conf" timeout 10 scontrol ping
  start_slurm_daemon slurmd
  wait_for 60 "the node" node_idle
  if [ -L /etc/slurm/slurm.conf ] && [ ! -e /etc/slurm/slurm.conf ]; then rm -f /etc/slurm/slurm.conf; fi  # dangling
  if [ ! -e /etc/slurm/slurm.conf ] && [ -d /etc/slurm ]; then ln -s "$conf" /etc/slurm/slurm.conf; fi
  say "up in $((SECONDS - start)) s: $(SLURM_CONF=$conf sinfo -h -o '%P %D node(s) %T, %c CPUs, %m MB')"
  say "clients: export SLURM_CONF=$conf"
}

stop_one() {
  local name=$1 pid i
  if ! alive "$name"; then rm -f "$pids/$name"; return 0; fi
  pid=$(cat "$pids/$name")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 150); do  # wait on /proc/PID, not the pid file; a zombie counts as stopped
    alive "$name" || break
    sleep 0.2
  done
  if alive "$name"; then say "$name ($pid) ignored SIGTERM for 30 s; killing it"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$pids/$name"
  say "stopped $name ($pid)"
}

cmd_down() {
  local i
  # Jobs first: slurmstepd and the job's processes outlive slurmd, and would keep using the cores.
  if alive slurmctld; then
    SLURM_CONF=$conf timeout 10 scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    for i in $(seq 1 150); do
      [ -z "$(SLURM_CONF=$conf timeout 10 squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  for (( i=${#daemons[@]}-1; i>=0; i-- )); do stop_one "${daemons[$i]}"; done
  if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$conf" ]; then rm -f /etc/slurm/slurm.conf; fi
  say "down"
}

cmd_status() {
  local all=1 name
  for name in "${daemons[@]}"; do
    if alive "$name"; then printf '%-10s running (pid %s)\n' "$name" "$(cat "$pids/$name")"
    else printf '%-10s stopped\n' "$name"; all=0; fi
  done
  if alive slurmctld; then SLURM_CONF=$conf timeout 10 sinfo || true; fi
  printf 'export SLURM_CONF=%q\n' "$conf"
  [ $all = 1 ]
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) printf 'export SLURM_CONF=%q\n' "$conf" ;;
  *) echo "usage: bash slurm/local_cluster.sh up|down|status|env" >&2; exit 2 ;;
esac
