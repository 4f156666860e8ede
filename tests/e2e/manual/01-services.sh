#!/bin/bash
# Start PostgreSQL 15 (15432), etcd (15379/15380), Redis (15390) on loopback; PIDs in /tmp/e2e/pids/
set -e
E=/tmp/e2e; mkdir -p $E/pids $E/logs
# PostgreSQL
PGD=$E/pgdata
if [ ! -d $PGD ]; then
  mkdir -p $PGD; chown postgres:postgres $PGD
  runuser -u postgres -- /usr/lib/postgresql/15/bin/initdb -D $PGD -A trust -U postgres >$E/logs/initdb.log 2>&1
fi
mkdir -p $E/pgsock; chown postgres:postgres $E/pgsock
setsid runuser -u postgres -- /usr/lib/postgresql/15/bin/postgres -D $PGD -p 15432 -c listen_addresses=127.0.0.1 -c unix_socket_directories=$E/pgsock -c max_connections=200 >$E/logs/postgres.log 2>&1 &
echo $! > $E/pids/postgres
# etcd
setsid etcd --name e2e --data-dir $E/etcd-data --listen-client-urls http://127.0.0.1:15379 --advertise-client-urls http://127.0.0.1:15379 --listen-peer-urls http://127.0.0.1:15380 --initial-advertise-peer-urls http://127.0.0.1:15380 --initial-cluster e2e=http://127.0.0.1:15380 >$E/logs/etcd.log 2>&1 &
echo $! > $E/pids/etcd
# redis
setsid redis-server --port 15390 --bind 127.0.0.1 --save '' --appendonly no --dir $E >$E/logs/redis.log 2>&1 &
echo $! > $E/pids/redis
sleep 3
for i in $(seq 20); do runuser -u postgres -- psql -h 127.0.0.1 -p 15432 -c 'select 1' >/dev/null 2>&1 && break; sleep 1; done
runuser -u postgres -- psql -h 127.0.0.1 -p 15432 -tc "select 1 from pg_roles where rolname='postgres'" 
runuser -u postgres -- psql -h 127.0.0.1 -p 15432 -c "ALTER USER postgres PASSWORD 'develove'" || true
runuser -u postgres -- psql -h 127.0.0.1 -p 15432 -tc "select 1 from pg_database where datname='backend'" | grep -q 1 || runuser -u postgres -- psql -h 127.0.0.1 -p 15432 -c "CREATE DATABASE backend"
redis-cli -p 15390 ping
ETCDCTL_API=3 etcdctl --endpoints http://127.0.0.1:15379 endpoint health
