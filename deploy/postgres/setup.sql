-- Production set-up of the Hive control-plane database on PostgreSQL (run once, as a superuser,
-- on the primary):   psql -v hive_password="'CHANGE-ME'" -f deploy/postgres/setup.sql
-- The control plane runs its own migrations at start (sqlx), so this only makes the role, the
-- database and the privileges; no tables here.
\set ON_ERROR_STOP on

SELECT 'CREATE ROLE hive LOGIN'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'hive') \gexec
ALTER ROLE hive LOGIN PASSWORD :hive_password NOSUPERUSER NOCREATEDB NOCREATEROLE;
-- A control plane must not hang on a stuck lock forever: its leases are 30 s by default.
ALTER ROLE hive SET lock_timeout = '5s';
ALTER ROLE hive SET statement_timeout = '15s';
ALTER ROLE hive SET idle_in_transaction_session_timeout = '30s';

SELECT 'CREATE DATABASE hive OWNER hive'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'hive') \gexec
REVOKE ALL ON DATABASE hive FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE hive TO hive;

\connect hive
-- Only the owner may create objects in the public schema (PostgreSQL 15 default; explicit here
-- for clusters upgraded from older versions).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
ALTER SCHEMA public OWNER TO hive;
