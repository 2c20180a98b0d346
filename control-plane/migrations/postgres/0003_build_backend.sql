-- The cell backend (microvm, sandbox) of the box a build was placed on, shown with the build.
ALTER TABLE builds ADD COLUMN backend TEXT NOT NULL DEFAULT '';
