#!/bin/sh
# Run once by the postgres image on an empty volume: the glidein state store gets a database and a
# role of its own, apart from Airflow's metadata database (tasks never touch Airflow's).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE ROLE glidein LOGIN PASSWORD '${GLIDEIN_STATE_PASSWORD}';
CREATE DATABASE glidein_state OWNER glidein;
SQL
