-- Regional hives (issue 13): a project may belong to another hive (its name, as given to that
-- hive's control planes with --hive-name); '' or this hive's own name builds here. A push for
-- a project of another hive is forwarded to that hive (--peer-hive NAME=URL) after its
-- signature is checked here.
ALTER TABLE projects ADD COLUMN hive TEXT NOT NULL DEFAULT '';
