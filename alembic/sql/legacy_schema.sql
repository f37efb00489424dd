-- The English (legacy) schema of the TinkuBot marketplace, as production has it before the migration.
-- Used by scripts/seed_legacy.py to build a sample database and by revision phase5's downgrade to
-- recreate the structure that phase5 drops (its rows come back from the phase's backup).
CREATE TABLE professions (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        varchar(100) NOT NULL,
    specialty   varchar(100),
    category    varchar(50),
    is_active   boolean DEFAULT true,
    created_at  timestamp DEFAULT now(),
    updated_at  timestamp DEFAULT now()
);
CREATE TABLE customers (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    phone_number       varchar(20) UNIQUE NOT NULL,
    full_name          varchar(255) NOT NULL,
    city               varchar(100),
    city_confirmed_at  timestamp,
    notes              text,
    created_at         timestamp DEFAULT now(),
    updated_at         timestamp DEFAULT now()
);
CREATE TABLE users (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    phone_number          varchar(20),
    name                  varchar(255),
    email                 varchar(255),
    user_type             varchar(20) NOT NULL CHECK (user_type IN ('provider', 'customer', 'admin')),
    business_name         varchar(255),
    business_description  text,
    address               text,
    city                  varchar(100),
    country               varchar(100),
    latitude              numeric(10, 7),
    longitude             numeric(10, 7),
    status                varchar(20),
    created_at            timestamp DEFAULT now(),
    updated_at            timestamp DEFAULT now()
);
CREATE TABLE provider_professions (
    provider_id          uuid NOT NULL REFERENCES users (id),
    profession_id        uuid NOT NULL REFERENCES professions (id),
    specialty            varchar(100),
    experience_years     integer,
    certifications       text,
    is_primary           boolean,
    verification_status  varchar(20),
    created_at           timestamp DEFAULT now(),
    PRIMARY KEY (provider_id, profession_id)
);
CREATE TABLE provider_services (
    id             bigserial PRIMARY KEY,
    provider_id    uuid NOT NULL REFERENCES users (id),
    profession_id  uuid REFERENCES professions (id),
    title          varchar(200) NOT NULL,
    description    text,
    price          numeric(10, 2),
    currency       varchar(3),
    is_active      boolean,
    created_at     timestamp DEFAULT now()
);
CREATE TABLE service_requests (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id    uuid NOT NULL REFERENCES customers (id),
    profession_id  uuid REFERENCES professions (id),
    description    text,
    city           varchar(100),
    status         varchar(20),
    requested_at   timestamp,
    created_at     timestamp DEFAULT now()
);
CREATE TABLE sessions (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id        uuid,
    session_id     varchar(100) UNIQUE NOT NULL,
    status         varchar(20),
    qr_code        text,
    session_data   text,
    expires_at     timestamp,
    last_activity  timestamp,
    created_at     timestamp DEFAULT now()
);
CREATE TABLE messages (
    id                 bigserial PRIMARY KEY,
    conversation_id    uuid,
    user_id            uuid,
    message_type       varchar(20),
    content            text,
    media_url          text,
    media_type         varchar(50),
    ai_response        text,
    processing_status  varchar(20),
    metadata           text,
    "timestamp"        timestamp DEFAULT now()
);
CREATE TABLE task_queue (
    id            bigserial PRIMARY KEY,
    task_type     varchar(50) NOT NULL,
    payload       text,
    status        varchar(20),
    scheduled_at  timestamp,
    attempts      integer,
    last_error    text,
    created_at    timestamp DEFAULT now()
);
