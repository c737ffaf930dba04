-- The language spoken in a segment, for jobs whose recording switches language (language "en,de"
-- or "multi"); NULL: the transcript's. Its search_text is indexed in it.
ALTER TABLE segments ADD COLUMN language text;
